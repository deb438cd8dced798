//! Writes shell completions and man pages for `amst`, generated from its clap definition.
//! Run by `cargo xtask dist`; by hand: `cargo run -p amst-cli --example dist -- OUT_DIR`.
//!
//! Output: `OUT_DIR/completions/{amst.bash, _amst, amst.fish, amst.elv, _amst.ps1}` and
//! `OUT_DIR/man/amst.1` plus one page per subcommand (`amst-serve.1`, ...).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use amst_cli::cli::Cli;
use clap::CommandFactory;
use clap_complete::Shell;

fn main() -> ExitCode {
    let Some(out) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: dist OUT_DIR");
        return ExitCode::from(2);
    };
    match write_all(&out) {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dist: {e}");
            ExitCode::FAILURE
        }
    }
}

fn write_all(out: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let completions = out.join("completions");
    std::fs::create_dir_all(&completions)?;
    for shell in [
        Shell::Bash,
        Shell::Zsh,
        Shell::Fish,
        Shell::Elvish,
        Shell::PowerShell,
    ] {
        let mut cmd = Cli::command();
        written.push(clap_complete::generate_to(
            shell,
            &mut cmd,
            "amst",
            &completions,
        )?);
    }
    let man = out.join("man");
    std::fs::create_dir_all(&man)?;
    let cmd = Cli::command();
    written.push(man_page(&cmd, &man, "amst")?);
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        let name = format!("amst-{}", sub.get_name());
        // clap names are `'static`; a few bytes per page, once.
        let page_name: &'static str = Box::leak(name.clone().into_boxed_str());
        let sub = sub
            .clone()
            .name(page_name)
            .bin_name(format!("amst {}", sub.get_name()));
        written.push(man_page(&sub, &man, &name)?);
    }
    Ok(written)
}

fn man_page(cmd: &clap::Command, dir: &Path, name: &str) -> std::io::Result<PathBuf> {
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .title(name.to_uppercase())
        .render(&mut page)?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, page)?;
    Ok(path)
}
