//! The peak memory of `amst serve --output` while it stores one large file: the whole job's
//! receiver, as a user runs it, with its default memory budget. The source and the copy are
//! on disk (beside the bench's report), not tmpfs, so that a 10 GiB file costs no RAM and a
//! disk slower than the network makes the server hold as much as its budget lets it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::contenders::PSK;
use super::procs::{amst_serve, run_json};
use super::tree::write_file;

/// How long one `amst send` may take, per GiB (a slow disk writes 100 MB/s).
const PER_GIB: Duration = Duration::from_secs(20);

/// What one `amst serve --output` run peaked at, and how the transfer went.
#[derive(Clone, Debug)]
pub struct ServePeak {
    /// The server's `VmHWM`, MiB.
    pub mib: f64,
    /// The sender's report in a line: modes, switches, streams, goodput.
    pub transfer: String,
}

/// Sends one generated file of `bytes` to `amst serve --output` over loopback and returns
/// the server's `VmHWM`, read from /proc while it still runs, after the send has exited
/// successfully. `work` holds the file and its copy (2 × `bytes`), removed after.
pub fn serve_output_peak(amst: &Path, bytes: u64, work: &Path) -> Result<ServePeak, String> {
    let (src, dst) = (work.join("src"), work.join("dst"));
    for d in [&src, &dst] {
        let _ = std::fs::remove_dir_all(d);
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let free = free_bytes(work)?;
    if free < bytes * 2 + (1 << 30) {
        return Err(format!(
            "{} has {} MiB free; a file of {} MiB and its copy need {} MiB (and 1 GiB spare)",
            work.display(),
            free >> 20,
            bytes >> 20,
            (bytes * 2) >> 20
        ));
    }
    let file = src.join("image");
    write_file(&file, bytes, 0x5e57e).map_err(|e| format!("writing {}: {e}", file.display()))?;
    let result = peak_while_storing(amst, &file, &dst, bytes, work);
    let _ = std::fs::remove_dir_all(&src);
    let _ = std::fs::remove_dir_all(&dst);
    result
}

fn peak_while_storing(
    amst: &Path,
    file: &Path,
    dst: &Path,
    bytes: u64,
    work: &Path,
) -> Result<ServePeak, String> {
    let (mut server, peer) = amst_serve(
        amst,
        &["-q".as_ref(), "--output".as_ref(), dst.as_os_str()],
        PSK,
        work,
    )?;
    let mut send = Command::new(amst);
    send.args(["send", "--json", &peer])
        .arg(file)
        .env("AMST_PSK", PSK);
    let report = work.join("amst-send.json");
    let within = PER_GIB * ((bytes >> 30) as u32 + 1);
    let json = run_json("amst send", send, work, &report, within)?;
    let peak = vm_hwm_kib(server.child.id())
        .ok_or_else(|| format!("amst serve is gone: {}", server.log_tail()))?;
    server.kill();
    let landed = std::fs::metadata(dst.join("image")).map_or(0, |m| m.len());
    if landed != bytes {
        return Err(format!(
            "the copy holds {landed} bytes of {bytes}: {}",
            server.log_tail()
        ));
    }
    Ok(ServePeak {
        mib: peak as f64 / 1024.0,
        transfer: transfer_line(&json, bytes),
    })
}

/// "10240 MiB: datacenter → datacenter, 0 switches, 64 streams, 4.8 Gbit/s", from the
/// sender's `--json` report.
fn transfer_line(json: &serde_json::Value, bytes: u64) -> String {
    let end = &json["end"];
    format!(
        "{} MiB: {} → {}, {} switches, {} streams, {:.1} Gbit/s",
        bytes >> 20,
        end["mode_start"].as_str().unwrap_or("?"),
        end["mode"].as_str().unwrap_or("?"),
        end["mode_switches"].as_u64().unwrap_or(0),
        end["streams"].as_u64().unwrap_or(0),
        end["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9
    )
}

/// `VmHWM` of a live process, in KiB.
pub fn vm_hwm_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn free_bytes(dir: &Path) -> Result<u64, String> {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(dir)
        .output()
        .map_err(|e| format!("df: {e}"))?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| format!("df could not tell the free space of {}", dir.display()))
}
