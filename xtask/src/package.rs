//! `cargo xtask package [--verify]`: `cargo package` for every library crate, together, so
//! that crates depending on each other resolve against the packaged versions rather than
//! crates.io. Without `--verify` it checks the manifests, metadata and file lists
//! (`--no-verify`): verifying rebuilds every crate from its tarball, minutes on a small
//! machine, and CI already builds the same sources.

use std::process::Command;

/// The crates meant for crates.io; the rest (amst-cli, amst-bench, xtask) are binaries or
/// tools, and amst-bench and xtask say `publish = false`.
pub const LIBRARY_CRATES: &[&str] = &[
    "amst-core",
    "amst-cc",
    "amst-tcp",
    "amst-quic",
    "amst-rdma",
    "amst-detect",
    "amst-hybrid",
    "amst-linkem",
    "amst-tls",
    "amst-files",
];

pub fn package(args: &[String]) -> Result<(), String> {
    let verify = match args {
        [] => false,
        [a] if a == "--verify" => true,
        _ => return Err("usage: cargo xtask package [--verify]".into()),
    };
    let mut argv: Vec<&str> = vec!["package", "--allow-dirty"];
    if !verify {
        argv.push("--no-verify");
    }
    for c in LIBRARY_CRATES {
        argv.extend(["-p", c]);
    }
    eprintln!("+ cargo {}", argv.join(" "));
    let status = Command::new("cargo")
        .args(&argv)
        .status()
        .map_err(|e| format!("could not start cargo: {e}"))?;
    if !status.success() {
        return Err(format!("cargo package failed ({status})"));
    }
    Ok(())
}
