//! `cargo xtask <command>`: the project's automation, in Rust so that it runs wherever cargo
//! does.

use std::process::{Command, ExitCode};

mod dist;
mod package;
mod rdma_vm;
mod setup;

fn main() -> ExitCode {
    forget_cargo_run_env();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("setup") => match args.get(1).map(String::as_str) {
            None => setup::ensure(setup::Need::Ci, false),
            Some("--dry-run") => setup::ensure(setup::Need::Ci, true),
            Some(other) => Err(format!("setup: unknown argument {other:?}")),
        },
        Some("fuzz") => fuzz(&args[1..]),
        Some("bench") => bench(&args[1..]),
        Some("rdma-vm") => rdma_vm::rdma_vm(&args[1..]),
        Some("dist") => dist::dist(&args[1..]),
        Some("package") => package::package(&args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask ci | setup [--dry-run] | bench [--quick] [--gate all|correctness|none] [--micro] [--rdma] [--scenario ID]... [--scale F] | fuzz [--time SECONDS] [--build-only] | rdma-vm [--help]"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Drops the variables `cargo run` set for this xtask (`CARGO_PKG_NAME=xtask`,
/// `CARGO_MANIFEST_DIR`, …) before any cargo child starts. Build scripts such as ring's declare
/// `rerun-if-env-changed` on some of them, so inheriting them made every `cargo xtask` build
/// recompile ring and what depends on it, and the next plain `cargo build` do it again.
fn forget_cargo_run_env() {
    let set_by_cargo_run: Vec<std::ffi::OsString> = std::env::vars_os()
        .map(|(k, _)| k)
        .filter(|k| {
            let k = k.to_string_lossy();
            k.starts_with("CARGO_PKG_")
                || k.starts_with("CARGO_MANIFEST_")
                || [
                    "CARGO_CRATE_NAME",
                    "CARGO_BIN_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                ]
                .contains(&k.as_ref())
        })
        .collect();
    for k in set_by_cargo_run {
        // SAFETY: called first thing in main, before this process starts any thread, so no
        // other thread can be reading the environment.
        unsafe { std::env::remove_var(k) };
    }
}

/// Tests that run traffic through amst-linkem: by convention their test binary or their name
/// mentions `linkem`.
const LINK_TESTS: &str = "package(amst-linkem) | binary(/linkem/) | test(/linkem/)";

/// Everything CI checks, in the order that fails fastest, after installing what is missing
/// (see [`setup`]): on a fresh machine with only a Rust toolchain this is the whole set-up.
fn ci() -> Result<(), String> {
    setup::ensure(setup::Need::Ci, false)?;
    run("cargo", &["fmt", "--all", "--", "--check"])?;
    let clippy = [
        "clippy",
        "--workspace",
        "--all-targets",
        "--all-features",
        "--",
        "-D",
        "warnings",
    ];
    run("cargo", &clippy)?;
    // Emulated-link tests time real traffic, so they run alone after everything else.
    let mut failures = Vec::new();
    let passes = [
        (
            "unit and loopback tests",
            format!("not ({LINK_TESTS})"),
            None,
        ),
        (
            "emulated-link tests, one at a time",
            LINK_TESTS.to_string(),
            Some("1"),
        ),
    ];
    for (pass, filter, threads) in &passes {
        eprintln!("== {pass}");
        let mut args = vec![
            "nextest",
            "run",
            "--workspace",
            "--all-features",
            "--profile",
            "ci",
            "--no-tests",
            "pass",
            "-E",
            filter,
        ];
        if let Some(t) = threads {
            args.extend(["--test-threads", t]);
        }
        if let Err(e) = run("cargo", &args) {
            failures.push(e);
        }
    }
    if let Err(e) = run("cargo", &["test", "--doc", "--workspace", "--all-features"]) {
        failures.push(e);
    }
    // Every library crate still packages (manifest, metadata, file list) for crates.io.
    if let Err(e) = package::package(&[]) {
        failures.push(e);
    }
    if let Err(e) = fuzz(&["--build-only".to_string()]) {
        failures.push(e);
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n"))
    }
}

/// The end-to-end perf gates: amst-bench's `amst-e2e` in release, writing
/// `target/bench/report.md`, `samples.json` and SVG plots, and failing when an enforced gate
/// in `bench/gates.toml` fails: `--gate all` (the default) enforces every gate, `--gate
/// correctness` only the correctness class (CI: the machine is too noisy for ratios), `--gate
/// none` reports only. A full run (no `--quick`, no `--scenario`) also writes
/// `bench/latest.md`, `latest.json` and the plots there.
///
/// `--micro` first runs the criterion micro-benchmarks where they live (amst-core's codec,
/// amst-cc's on_ack, amst-hybrid's ArcSwap hot path, amst-bench's reassembly) and folds their
/// estimates into the report.
///
/// `--rdma` first runs `cargo xtask rdma-vm` (two Soft-RoCE qemu VMs, 3-6 minutes, guest limit
/// 900 s) unless `--scenario` leaves out `rdma`, and hands its goodputs to the `rdma` scenario
/// through `target/bench/rdma.json` (`--rdma-result`); if the VM run fails, the file carries
/// the failure and the scenario fails with it. Without `--rdma` that scenario is listed as
/// not run. Every other argument goes to `amst-e2e`.
///
/// Unless `--scenario` leaves out `files`, `rss` and `detect`, it first builds the `amst`
/// binary in release, which those scenarios drive.
fn bench(args: &[String]) -> Result<(), String> {
    setup::ensure(setup::Need::CiAndBench, false)?;
    let micro = args.iter().any(|a| a == "--micro");
    let quick = args.iter().any(|a| a == "--quick");
    let rdma = args.iter().any(|a| a == "--rdma");
    let mut rest: Vec<String> = args
        .iter()
        .filter(|a| *a != "--micro" && *a != "--rdma")
        .cloned()
        .collect();
    if micro {
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|e| e.to_string())?
            .as_secs();
        // Criterion's defaults (3 s warm-up, 5 s measuring) per bench; --quick halves both.
        let timing: &[&str] = if quick {
            &["--warm-up-time", "1", "--measurement-time", "2"]
        } else {
            &[]
        };
        // Every bench amst-core has (codec, and whatever else lands there), by name: `--benches`
        // would also run the lib's unit tests, which reject criterion's options.
        let mut core = vec!["-p".to_string(), "amst-core".to_string()];
        let mut names: Vec<String> = std::fs::read_dir("amst-core/benches")
            .map_err(|e| format!("amst-core/benches: {e}"))?
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().to_string();
                n.strip_suffix(".rs").map(str::to_string)
            })
            .collect();
        names.sort();
        for n in names {
            core.extend(["--bench".to_string(), n]);
        }
        let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let benches = [
            core,
            owned(&["-p", "amst-cc", "--features", "quinn", "--bench", "on_ack"]),
            owned(&["-p", "amst-hybrid", "--bench", "hot_path"]),
            owned(&["-p", "amst-bench", "--bench", "reassembly"]),
        ];
        for b in &benches {
            let mut cmd = vec!["bench"];
            cmd.extend(b.iter().map(String::as_str));
            cmd.push("--");
            cmd.extend_from_slice(timing);
            run("cargo", &cmd)?;
        }
        rest.extend(["--micro-since".to_string(), since.to_string()]);
    }
    let only: Vec<&str> = args
        .windows(2)
        .filter(|w| w[0] == "--scenario")
        .map(|w| w[1].as_str())
        .collect();
    if only.is_empty() || only.iter().any(|s| ["files", "rss", "detect"].contains(s)) {
        // The files, rss and detect scenarios drive the `amst` binary as a user would;
        // amst-e2e finds it beside itself in target/release.
        run(
            "cargo",
            &["build", "--release", "-p", "amst-cli", "--bin", "amst"],
        )?;
    }
    if rdma {
        if only.is_empty() || only.contains(&"rdma") {
            let result = "target/bench/rdma.json";
            rdma_bench(result);
            rest.extend(["--rdma-result".to_string(), result.to_string()]);
        } else {
            eprintln!("xtask: --rdma ignored: --scenario leaves out rdma");
        }
    }
    let mut cmd = vec![
        "run",
        "--release",
        "-p",
        "amst-bench",
        "--bin",
        "amst-e2e",
        "--",
    ];
    cmd.extend(rest.iter().map(String::as_str));
    run("cargo", &cmd)
}

/// Runs the Soft-RoCE VMs for the `rdma` bench scenario and leaves their goodputs in `result`,
/// or the reason they have none: a failed VM run fails that scenario, and the others still run.
fn rdma_bench(result: &str) {
    let vm_args = ["--result", result, "--timeout", "900"].map(String::from);
    eprintln!("+ cargo xtask rdma-vm {}", vm_args.join(" "));
    let Err(e) = rdma_vm::rdma_vm(&vm_args) else {
        return;
    };
    eprintln!("xtask: the RDMA VM run failed; the rdma scenario will say so:\n{e}");
    let json = vm_failure_json(&e);
    let path = std::path::Path::new(result);
    let written = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(path, json));
    if let Err(w) = written {
        eprintln!("xtask: writing {result}: {w}");
    }
}

/// The `{"error": …}` file amst-e2e's rdma scenario reports as its failure: the report gets the
/// step names, not the guest output tails (those are on the console).
fn vm_failure_json(error: &str) -> String {
    let mut why: String = error
        .lines()
        .filter(|l| !l.starts_with("      ") && !l.trim().is_empty())
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("; ");
    if let Some((cut, _)) = why.char_indices().nth(400) {
        why.truncate(cut);
        why.push('…');
    }
    format!("{{\"error\": {}}}\n", rdma_vm::json_string(&why))
}

/// Builds every cargo-fuzz target and runs each for `--time` seconds (default 60). cargo-fuzz
/// needs nightly flags; `RUSTC_BOOTSTRAP=1` lets the stable toolchain accept them.
fn fuzz(args: &[String]) -> Result<(), String> {
    let mut seconds = 60u64;
    let mut build_only = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--time" => {
                let v = it.next().ok_or("--time needs a number of seconds")?;
                seconds = v
                    .parse()
                    .map_err(|_| format!("--time: {v:?} is not a number of seconds"))?;
            }
            "--build-only" => build_only = true,
            other => return Err(format!("fuzz: unknown argument {other:?}")),
        }
    }
    if Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .map_or(true, |o| !o.status.success())
    {
        run("cargo", &["install", "--locked", "cargo-fuzz"])?;
    }
    let root = std::env::current_dir().map_err(|e| e.to_string())?;
    let target_dir = root.join("target/fuzz");
    let fuzz_cmd = |extra: &[&str]| -> Result<std::process::Output, String> {
        Command::new("cargo")
            .arg("fuzz")
            .args(extra)
            .current_dir(root.join("fuzz"))
            .env("RUSTC_BOOTSTRAP", "1")
            .env("CARGO_TARGET_DIR", &target_dir)
            .output()
            .map_err(|e| format!("could not start cargo fuzz: {e}"))
    };
    eprintln!("+ cargo fuzz build -O");
    let built = fuzz_cmd(&["build", "-O"])?;
    if !built.status.success() {
        return Err(format!(
            "cargo fuzz build failed:\n{}",
            String::from_utf8_lossy(&built.stderr)
        ));
    }
    if build_only {
        return Ok(());
    }
    let list = fuzz_cmd(&["list"])?;
    let targets = String::from_utf8_lossy(&list.stdout).to_string();
    let mut failed = Vec::new();
    for target in targets.lines().map(str::trim).filter(|t| !t.is_empty()) {
        let time = format!("-max_total_time={seconds}");
        eprintln!("+ cargo fuzz run -O {target} -- {time}");
        let out = fuzz_cmd(&["run", "-O", target, "--", &time])?;
        let log = String::from_utf8_lossy(&out.stderr);
        let done = log
            .lines()
            .rev()
            .find(|l| l.starts_with("Done "))
            .unwrap_or("no summary line");
        println!("{target}: {done}");
        if !out.status.success() {
            eprintln!("{log}");
            failed.push(target.to_string());
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("fuzz targets crashed: {}", failed.join(", ")))
    }
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    setup::run_env(program, args, &[])
}

#[cfg(test)]
mod tests {
    #[test]
    fn vm_failure_keeps_step_names_and_escapes_them() {
        let err = "rdma-vm failed:\n  client: step fail(exit 101) vm (\"vm-1\")\n      guest output (tail):\n      |     panicked at C:\\x\n  VMs still running after 900s; killed";
        assert_eq!(
            super::vm_failure_json(err),
            "{\"error\": \"rdma-vm failed:; client: step fail(exit 101) vm (\\\"vm-1\\\"); VMs still running after 900s; killed\"}\n"
        );
        let long = super::vm_failure_json(&"é".repeat(1000));
        assert_eq!(long.chars().filter(|c| *c == 'é').count(), 400);
    }
}
