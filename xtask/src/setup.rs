//! What `cargo xtask ci` and `cargo xtask bench` need on the machine, and installing it.
//!
//! Cargo tools are installed with `cargo install --locked` (no root needed). Debian packages
//! are installed with apt-get when running as root; otherwise the run stops before anything
//! else, printing the exact command to run. Add a package to [`APT`] and every entry point
//! picks it up.

use std::path::{Path, PathBuf};
use std::process::Command;

/// How to tell that something is already on the machine.
#[derive(Clone, Copy, Debug)]
pub enum Probe {
    /// An executable of this name on `PATH`.
    Command(&'static str),
    /// libclang, as bindgen finds it: `LIBCLANG_PATH`, an LLVM install under `/usr/lib`, or
    /// the multiarch library directory.
    Libclang,
}

/// Who needs a package; `ci` installs everything, `bench` only what the bench uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// `cargo xtask ci` (tests, clippy with `--all-features`, promtool checks).
    Ci,
    /// `cargo xtask ci` and `cargo xtask bench`.
    CiAndBench,
    /// `cargo xtask ci` and the Soft-RoCE VM run (`cargo xtask rdma-vm`, `bench --rdma`),
    /// which builds amst-rdma's `rdma` feature.
    CiAndRdma,
}

/// One Debian package and why it is needed.
#[derive(Clone, Copy, Debug)]
pub struct AptPackage {
    /// The Debian package name.
    pub package: &'static str,
    /// How to see that it is installed.
    pub probe: Probe,
    /// Which entry points need it.
    pub need: Need,
    /// Why, for the message printed when it is missing.
    pub why: &'static str,
}

/// Every Debian package the tests and the bench use. The one place to add a new one.
pub const APT: &[AptPackage] = &[
    AptPackage {
        package: "cmake",
        probe: Probe::Command("cmake"),
        need: Need::CiAndRdma,
        why: "rdma-mummy-sys (amst-rdma's `rdma` feature, built by --all-features)",
    },
    AptPackage {
        package: "libclang-dev",
        probe: Probe::Libclang,
        need: Need::CiAndRdma,
        why: "bindgen in rdma-mummy-sys",
    },
    AptPackage {
        package: "iperf3",
        probe: Probe::Command("iperf3"),
        need: Need::CiAndBench,
        why: "the bench's reference contender and amst-linkem's tests",
    },
    AptPackage {
        package: "iproute2",
        probe: Probe::Command("ip"),
        need: Need::CiAndBench,
        why: "amst-linkem's network namespaces",
    },
    AptPackage {
        package: "iputils-ping",
        probe: Probe::Command("ping"),
        need: Need::Ci,
        why: "amst-linkem's delay tests",
    },
    AptPackage {
        package: "rsync",
        probe: Probe::Command("rsync"),
        need: Need::CiAndBench,
        why: "the files scenario's rsync daemon baseline",
    },
    AptPackage {
        package: "netcat-openbsd",
        probe: Probe::Command("nc.openbsd"),
        need: Need::CiAndBench,
        why: "the files scenario's `tar | nc` baseline",
    },
    AptPackage {
        package: "prometheus",
        probe: Probe::Command("promtool"),
        need: Need::Ci,
        why: "`promtool check metrics` on a /metrics scrape",
    },
    AptPackage {
        package: "b3sum",
        probe: Probe::Command("b3sum"),
        need: Need::Ci,
        why: "cross-checking amst-files' BLAKE3 digests",
    },
];

/// A cargo subcommand installed with `cargo install --locked <krate>`.
#[derive(Clone, Copy, Debug)]
pub struct CargoTool {
    /// The subcommand, as in `cargo <subcommand> --version`.
    pub subcommand: &'static str,
    /// The crate that provides it.
    pub krate: &'static str,
}

/// cargo-nextest runs the tests; cargo-fuzz builds the fuzz targets.
pub const CARGO_TOOLS: &[CargoTool] = &[
    CargoTool {
        subcommand: "nextest",
        krate: "cargo-nextest",
    },
    CargoTool {
        subcommand: "fuzz",
        krate: "cargo-fuzz",
    },
];

/// What is missing, and the commands that would install it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Debian packages to install.
    pub apt: Vec<&'static str>,
    /// Crates to `cargo install --locked`.
    pub cargo: Vec<&'static str>,
}

impl Plan {
    /// What `need` asks for and this machine lacks. `path` is the `PATH` searched for
    /// commands.
    pub fn for_machine(need: Need, path: &str, cargo_has: impl Fn(&str) -> bool) -> Plan {
        let apt = APT
            .iter()
            .filter(|p| need == Need::Ci || p.need == need)
            .filter(|p| !present(p.probe, path))
            .map(|p| p.package)
            .collect();
        let cargo = match need {
            Need::Ci => CARGO_TOOLS
                .iter()
                .filter(|t| !cargo_has(t.subcommand))
                .map(|t| t.krate)
                .collect(),
            Need::CiAndBench | Need::CiAndRdma => Vec::new(),
        };
        Plan { apt, cargo }
    }

    /// The apt-get command line that installs the missing packages, prefixed with `sudo`
    /// for a user who is not root.
    pub fn apt_command(&self, root: bool) -> Option<String> {
        if self.apt.is_empty() {
            return None;
        }
        let sudo = if root { "" } else { "sudo " };
        Some(format!(
            "{sudo}apt-get update && {sudo}env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends {}",
            self.apt.join(" ")
        ))
    }
}

fn present(probe: Probe, path: &str) -> bool {
    match probe {
        Probe::Command(name) => on_path(name, path),
        Probe::Libclang => libclang_present(),
    }
}

fn on_path(name: &str, path: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(path).any(|dir| {
        std::fs::metadata(dir.join(name))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

fn libclang_present() -> bool {
    let mut dirs: Vec<PathBuf> = std::env::var_os("LIBCLANG_PATH")
        .map(|p| vec![PathBuf::from(p)])
        .unwrap_or_default();
    if let Ok(entries) = std::fs::read_dir("/usr/lib") {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("llvm-") {
                dirs.push(e.path().join("lib"));
            }
        }
    }
    dirs.push(PathBuf::from("/usr/lib/x86_64-linux-gnu"));
    dirs.push(PathBuf::from("/usr/lib/aarch64-linux-gnu"));
    dirs.iter().any(|d| has_libclang(d))
}

fn has_libclang(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            is_libclang(&n)
        })
    })
}

/// C's libclang as bindgen loads it (`libclang.so`, `libclang-14.so.1`, ...). LLVM's C++
/// library `libclang-cpp.so.14` comes with other packages (llvm-14's tools) and matches
/// bindgen's globs, but bindgen cannot use it, so it does not count.
fn is_libclang(name: &str) -> bool {
    name.starts_with("libclang") && !name.starts_with("libclang-cpp") && name.contains(".so")
}

/// Whether this process runs as root (effective uid 0), read from `/proc/self/status`.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

fn cargo_has(subcommand: &str) -> bool {
    Command::new("cargo")
        .args([subcommand, "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Installs what `need` lacks. Not root with packages missing: an error carrying the exact
/// command, before anything else runs. `dry_run` prints the plan and installs nothing.
pub fn ensure(need: Need, dry_run: bool) -> Result<(), String> {
    let path = std::env::var("PATH").unwrap_or_default();
    let plan = Plan::for_machine(need, &path, cargo_has);
    let root = is_root();
    if plan == Plan::default() {
        eprintln!("xtask setup: every tool is installed");
        return Ok(());
    }
    for p in APT.iter().filter(|p| plan.apt.contains(&p.package)) {
        eprintln!("xtask setup: missing {} ({})", p.package, p.why);
    }
    for k in &plan.cargo {
        eprintln!("xtask setup: missing {k}");
    }
    if let Some(cmd) = plan.apt_command(root) {
        if !root && !dry_run {
            return Err(format!(
                "Debian packages are missing and this is not root; run this, then try again:\n  {cmd}"
            ));
        }
        if dry_run {
            eprintln!("xtask setup: would run: {cmd}");
        } else {
            let env = [("DEBIAN_FRONTEND", "noninteractive")];
            run_env("apt-get", &["update", "-qq"], &env)?;
            let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
            args.extend(plan.apt.iter().copied());
            run_env("apt-get", &args, &env)?;
        }
    }
    for k in &plan.cargo {
        if dry_run {
            eprintln!("xtask setup: would run: cargo install --locked {k}");
        } else {
            run_env("cargo", &["install", "--locked", k], &[])?;
        }
    }
    if !dry_run {
        let after = Plan::for_machine(need, &std::env::var("PATH").unwrap_or_default(), cargo_has);
        if after != Plan::default() {
            return Err(format!(
                "still missing after installing: {:?} (is ~/.cargo/bin on PATH?)",
                after
            ));
        }
    }
    Ok(())
}

/// Runs `program` with `args` (and `env` added), echoing the command; fails naming it.
pub(crate) fn run_env(program: &str, args: &[&str], env: &[(&str, &str)]) -> Result<(), String> {
    eprintln!("+ {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .status()
        .map_err(|e| format!("could not start {program}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{program} {}` failed with {status}",
            args.join(" ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_path_plans_every_command_package_and_the_cargo_tools() {
        let plan = Plan::for_machine(Need::Ci, "", |_| false);
        for p in APT {
            if matches!(p.probe, Probe::Command(_)) {
                assert!(plan.apt.contains(&p.package), "{} not planned", p.package);
            }
        }
        assert_eq!(plan.cargo, vec!["cargo-nextest", "cargo-fuzz"]);
        let cmd = plan.apt_command(false).unwrap();
        assert!(
            cmd.starts_with("sudo apt-get update && sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends cmake"),
            "{cmd}"
        );
        assert!(!plan.apt_command(true).unwrap().contains("sudo"));
    }

    #[test]
    fn llvm_cpp_library_is_not_libclang() {
        assert!(is_libclang("libclang.so"));
        assert!(is_libclang("libclang-14.so.1"));
        assert!(is_libclang("libclang.so.14"));
        assert!(!is_libclang("libclang-cpp.so.14"));
        assert!(!is_libclang("libclang-cpp.so"));
        assert!(!is_libclang("libclangBasic.a"));
    }

    #[test]
    fn bench_needs_only_its_packages_and_no_cargo_tools() {
        let plan = Plan::for_machine(Need::CiAndBench, "", |_| false);
        assert!(plan.apt.contains(&"iperf3"));
        assert!(!plan.apt.contains(&"cmake"));
        assert!(plan.cargo.is_empty());
    }

    #[test]
    fn the_vm_run_needs_what_builds_the_rdma_feature() {
        let plan = Plan::for_machine(Need::CiAndRdma, "", |_| false);
        assert!(plan.apt.contains(&"cmake"));
        assert!(!plan.apt.contains(&"iperf3"));
        assert!(plan.cargo.is_empty());
    }

    #[test]
    fn a_command_on_path_is_not_planned() {
        let dir = std::env::temp_dir().join(format!("xtask-setup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let exe = dir.join("iperf3");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let plan = Plan::for_machine(Need::CiAndBench, dir.to_str().unwrap(), |_| true);
        assert!(!plan.apt.contains(&"iperf3"));
        assert!(plan.apt.contains(&"rsync"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
