//! `cargo xtask dist [OUT_DIR]`: shell completions and man pages for `amst`, generated from
//! its clap definition by amst-cli's `dist` example (default OUT_DIR: target/dist).

use std::process::Command;

pub fn dist(args: &[String]) -> Result<(), String> {
    let out = match args {
        [] => "target/dist".to_string(),
        [dir] if !dir.starts_with('-') => dir.clone(),
        _ => return Err("usage: cargo xtask dist [OUT_DIR]".into()),
    };
    let argv = [
        "run",
        "--quiet",
        "-p",
        "amst-cli",
        "--example",
        "dist",
        "--",
        &out,
    ];
    eprintln!("+ cargo {}", argv.join(" "));
    let status = Command::new("cargo")
        .args(argv)
        .status()
        .map_err(|e| format!("could not start cargo: {e}"))?;
    if !status.success() {
        return Err(format!(
            "generating completions and man pages failed ({status})"
        ));
    }
    eprintln!("dist: completions in {out}/completions, man pages in {out}/man");
    Ok(())
}
