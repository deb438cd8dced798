//! The `files` scenario: the bulk-data job end to end. `amst send` to `amst serve --output`
//! (the release binaries, driven as a user would) against rsync to a local rsync daemon and
//! `tar | nc`, interleaved per round, on four workloads: one large file, many small files, a
//! sparse image, and a tree across the emulated 200 Mbit/s, 100 ms, 1% loss link.
//!
//! Source and destination live on tmpfs (a mount of its own when root, else `/dev/shm`), so
//! the disk is not what is measured; the destination is emptied before every run. Every run
//! is checked at the receiver, byte for byte, before its goodput counts: a run whose copy
//! differs fails, and amst's differing files are counted in `amst_mismatched_files`. The
//! sparse image's copy must keep its holes: `sparse_amst_allocated_over_data` is what the
//! receiver's `du` shows over the data the image holds.

mod contenders;
pub(crate) mod procs;
mod serve_memory;
mod tree;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use amst_linkem::LinkEm;

use crate::report::{Contender, Scenario};
use contenders::{Place, RsyncDaemon, amst_once, blast_once, cp_once, tar_nc_once};
pub use serve_memory::{ServePeak, serve_output_peak, vm_hwm_kib};

/// Sizes and rounds of one `files` run.
#[derive(Clone, Debug, PartialEq)]
pub struct FilesPlan {
    /// Interleaved rounds; every contender needs a sample from each.
    pub rounds: usize,
    /// The large file's size.
    pub large_bytes: u64,
    /// How many small files.
    pub small_files: usize,
    /// Each small file's size.
    pub small_file_bytes: u64,
    /// The sparse image's size.
    pub sparse_bytes: u64,
    /// The data the sparse image holds (the rest is holes).
    pub sparse_data_bytes: u64,
    /// The tree sent across the emulated link: one file of this size…
    pub wan_file_bytes: u64,
    /// …and this many small files.
    pub wan_small_files: usize,
}

impl FilesPlan {
    /// The full run at `scale` (1 = 4 GiB, 10,000 files of 4 KiB, an 8 GiB image holding
    /// 512 MiB, and a 64 MiB + 1,000 small files tree across the link).
    pub fn full(scale: f64) -> FilesPlan {
        let mib = |full: u64| ((full as f64 * scale) as u64).max(16) << 20;
        let sparse_data = mib(512).min(512 << 20);
        FilesPlan {
            rounds: 3,
            large_bytes: mib(4096),
            small_files: ((10_000.0 * scale) as usize).max(100),
            small_file_bytes: 4096,
            sparse_bytes: (sparse_data * 16).max(mib(8192)),
            sparse_data_bytes: sparse_data,
            wan_file_bytes: mib(64),
            wan_small_files: ((1000.0 * scale) as usize).max(100),
        }
    }

    /// `--quick`: a harness check in about a minute, not a measurement.
    pub fn quick() -> FilesPlan {
        FilesPlan {
            rounds: 3,
            large_bytes: 256 << 20,
            small_files: 1000,
            small_file_bytes: 4096,
            sparse_bytes: 512 << 20,
            sparse_data_bytes: 32 << 20,
            wan_file_bytes: 8 << 20,
            wan_small_files: 100,
        }
    }

    /// What the scenario measures, in a sentence.
    pub fn description(&self) -> String {
        format!(
            "`amst send` to `amst serve --output` (release binaries, default options) vs rsync to a \
             local rsync daemon and `tar | nc` (netcat-openbsd), tmpfs to tmpfs, {} interleaved rounds \
             (the writers' order rotates each round; on loopback an untimed `cp -a` first warms \
             the memory they write into, and each copy is deleted only as the next writer starts): \
             large = one {} MiB file (rsync -a --whole-file; also amst-tcp's blast loop, memory to \
             memory, at the stream count amst used), and on loopback `cp -a` (a local copy: the \
             file system's own pace in that round), small = {} files of {} bytes (rsync -a), sparse = \
             a {} MiB image holding {} MiB (rsync -a -S, tar -S; goodput counts the image's full \
             size), wan = a {} MiB file and {} small files across amst-linkem 200 Mbit/s, 100 ms \
             RTT, 1% loss (Mbit/s; sender's TCP default set to bbr, since one CUBIC flow gets about \
             1.5 Mbit/s there); goodput = bytes of the tree / time until every process of the \
             transfer has exited; every copy is compared byte for byte at the receiver",
            self.rounds,
            self.large_bytes >> 20,
            self.small_files,
            self.small_file_bytes,
            self.sparse_bytes >> 20,
            self.sparse_data_bytes >> 20,
            self.wan_file_bytes >> 20,
            self.wan_small_files,
        )
    }

    /// What the tmpfs must hold at most: a workload's source and one copy of it (an image
    /// copied without its holes included, so that its `du` can be reported).
    fn tmpfs_bytes(&self) -> u64 {
        let small = self.small_files as u64 * self.small_file_bytes.max(4096);
        let wan =
            self.wan_file_bytes + self.wan_small_files as u64 * self.small_file_bytes.max(4096);
        [
            2 * self.large_bytes,
            self.sparse_bytes + self.sparse_data_bytes,
            2 * small,
            2 * wan,
        ]
        .into_iter()
        .max()
        .unwrap_or(0)
            + (256 << 20)
    }

    /// Memory the run needs when every contender keeps holes: the large file twice.
    fn memory_needed(&self) -> u64 {
        2 * self.large_bytes.max(self.sparse_data_bytes) + (512 << 20)
    }
}

/// The four workloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Workload {
    Large,
    Small,
    Sparse,
    Wan,
}

impl Workload {
    /// Prefix of its contenders' names and its metrics.
    fn key(self) -> &'static str {
        match self {
            Workload::Large => "large",
            Workload::Small => "small",
            Workload::Sparse => "sparse",
            Workload::Wan => "wan",
        }
    }

    /// The entry sent, under the source directory.
    fn entry(self) -> &'static str {
        match self {
            Workload::Large => "large.bin",
            Workload::Small => "small-tree",
            Workload::Sparse => "sparse.img",
            Workload::Wan => "wan-tree",
        }
    }

    fn rsync_flags(self) -> &'static [&'static str] {
        match self {
            Workload::Large => &["-a", "--whole-file"],
            Workload::Small | Workload::Wan => &["-a"],
            Workload::Sparse => &["-a", "-S"],
        }
    }

    fn tar_flags(self) -> &'static [&'static str] {
        match self {
            Workload::Sparse => &["-S"],
            _ => &[],
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Workload::Wan => "Mbit/s",
            _ => "Gbit/s",
        }
    }

    /// Goodput in this workload's unit.
    fn goodput(self, bytes: u64, took: Duration) -> f64 {
        let scale = if self == Workload::Wan { 1e6 } else { 1e9 };
        bytes as f64 * 8.0 / took.as_secs_f64().max(1e-9) / scale
    }

    /// Writes the workload under `src`, returning the entry's path.
    fn write(self, plan: &FilesPlan, src: &Path) -> std::io::Result<PathBuf> {
        let path = src.join(self.entry());
        match self {
            Workload::Large => tree::write_file(&path, plan.large_bytes, 1)?,
            Workload::Small => {
                tree::write_small_tree(&path, plan.small_files, plan.small_file_bytes, 2)?
            }
            Workload::Sparse => {
                tree::write_sparse(&path, plan.sparse_bytes, plan.sparse_data_bytes, 3)?
            }
            Workload::Wan => {
                tree::write_small_tree(&path, plan.wan_small_files, plan.small_file_bytes, 4)?;
                tree::write_file(&path.join("data.bin"), plan.wan_file_bytes, 5)?;
            }
        }
        Ok(path)
    }
}

/// The emulated internet link of the `wan-*` scenarios: 200 Mbit/s, 100 ms RTT, 1% loss, a
/// 1 BDP queue.
const WAN_RATE: u64 = 200_000_000;
const WAN_RTT: Duration = Duration::from_millis(100);

/// Runs the scenario with the `amst` binary at `amst`.
pub fn scenario(plan: &FilesPlan, amst: &Path) -> Scenario {
    let mut s = Scenario::new("files", plan.description());
    if let Err(why) = preflight(plan, amst) {
        s.failed = Some(why);
        return s;
    }
    let scratch = match Scratch::new(plan.tmpfs_bytes()) {
        Ok(sc) => sc,
        Err(why) => {
            s.failed = Some(why);
            return s;
        }
    };
    s.notes.push(scratch.note.clone());
    let mut mismatched = 0usize;
    for w in [Workload::Large, Workload::Small, Workload::Sparse] {
        if let Err(why) = run_workload(
            &mut s,
            plan,
            w,
            Place::Loopback,
            &scratch,
            amst,
            &mut mismatched,
        ) {
            s.failed = Some(format!("{}: {why}", w.key()));
            return s;
        }
    }
    match amst_linkem::check_privileges() {
        Err(why) => s.notes.push(format!(
            "wan: the tree across the emulated link was skipped: {why}"
        )),
        Ok(()) => {
            let result = wan_link().and_then(|link| {
                s.notes.push(sender_bbr(&link));
                run_workload(
                    &mut s,
                    plan,
                    Workload::Wan,
                    Place::Link(&link),
                    &scratch,
                    amst,
                    &mut mismatched,
                )
            });
            if let Err(why) = result {
                s.failed = Some(format!("wan: {why}"));
                return s;
            }
        }
    }
    s.metrics
        .insert("amst_mismatched_files".into(), mismatched as f64);
    s
}

/// Everything the scenario needs, checked before anything is written.
fn preflight(plan: &FilesPlan, amst: &Path) -> Result<(), String> {
    if !amst.is_file() {
        return Err(format!(
            "no amst binary at {}: build it with `cargo build --release -p amst-cli` (cargo xtask bench does)",
            amst.display()
        ));
    }
    if tree::sparse_layout(plan.sparse_bytes, plan.sparse_data_bytes).is_none() {
        return Err(format!(
            "a {} byte image cannot hold {} bytes of data in spaced extents",
            plan.sparse_bytes, plan.sparse_data_bytes
        ));
    }
    for (tool, arg, expect, package) in [
        ("rsync", "--version", "rsync", "rsync"),
        ("nc.openbsd", "-h", "OpenBSD netcat", "netcat-openbsd"),
        ("tar", "--version", "GNU tar", "tar"),
    ] {
        if !procs::tool_present(tool, arg, expect) {
            return Err(format!(
                "{tool} is missing: install the Debian package {package} (cargo xtask setup does)"
            ));
        }
    }
    let available = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib << 10);
    if let Some(have) = available
        && have < plan.memory_needed()
    {
        return Err(format!(
            "needs {} MiB of free memory for its tmpfs (the large file and its copy), MemAvailable is {} MiB",
            plan.memory_needed() >> 20,
            have >> 20
        ));
    }
    Ok(())
}

/// Runs one workload's rounds and adds its contenders and metrics to `s`. An error is a
/// failure of the harness (a file it could not write); a contender's failed run is recorded
/// in the contender instead.
fn run_workload(
    s: &mut Scenario,
    plan: &FilesPlan,
    w: Workload,
    place: Place<'_>,
    scratch: &Scratch,
    amst: &Path,
    mismatched: &mut usize,
) -> Result<(), String> {
    let key = w.key();
    let (src_dir, dst, work) = (
        scratch.dir("src")?,
        scratch.dir("dst")?,
        scratch.dir("work")?,
    );
    let src = w
        .write(plan, &src_dir)
        .map_err(|e| format!("writing the source under {}: {e}", src_dir.display()))?;
    let bytes = tree::apparent_bytes(&src).map_err(|e| e.to_string())?;
    let landed = dst.join(w.entry());
    let rounds = plan.rounds;
    let unit = w.unit();
    let rsync_name = format!("{key}: rsync {} (daemon)", w.rsync_flags().join(" "));
    let tar_name = format!(
        "{key}: tar {}| nc",
        w.tar_flags()
            .iter()
            .map(|f| format!("{f} "))
            .collect::<String>()
    );
    let mut amst_c = Contender::new(format!("{key}: amst send"), unit).expecting(rounds);
    let mut rsync_c = Contender::new(rsync_name, unit).expecting(rounds);
    let mut tar_c = Contender::new(tar_name, unit).expecting(rounds);
    let mut blast_c = (w == Workload::Large).then(|| {
        Contender::new(
            format!("{key}: amst-tcp blast (memory to memory, amst's stream count)"),
            unit,
        )
        .expecting(rounds)
    });
    let mut cp_c = matches!(place, Place::Loopback).then(|| {
        Contender::new(
            format!("{key}: cp -a (local copy, no network: the file system's pace)"),
            unit,
        )
        .expecting(rounds)
    });
    // What the receiver's copy of the image takes on disk, over the data it holds, per run.
    let mut allocated: [Vec<f64>; 3] = Default::default();
    let mut sent_over_data: Vec<f64> = Vec::new();
    let mut blast_streams: Option<usize> = None;
    // Generous: a bound on a stuck run, never a pace anybody is held to.
    let floor = match place {
        Place::Loopback => 20e6,
        Place::Link(_) => 1e6,
    };
    let within = Duration::from_secs(60) + Duration::from_secs_f64(bytes as f64 / floor);
    let mut daemon = RsyncDaemon::start(place, &dst, &work)?;
    let id = s.id.clone();
    // On a VM whose host backs freed guest memory lazily, a copy written into memory that sat
    // free for a few seconds runs at half speed or worse; whoever writes first after an idle
    // gap pays for it. So each copy stays until the next writer is about to start (no gap
    // between a deletion and a write), an untimed local copy first warms the memory every
    // contender writes into, and the order rotates each round.
    if matches!(place, Place::Loopback) {
        empty(&dst)?;
        cp_once(&src, &dst, &work, within)?;
    }
    let mut writers = vec![Writer::Amst, Writer::Rsync, Writer::TarNc];
    if cp_c.is_some() {
        writers.push(Writer::Cp);
    }
    for round in 0..rounds {
        eprintln!("files: {key} round {}/{rounds}", round + 1);
        for writer in writers
            .iter()
            .cycle()
            .skip(round % writers.len())
            .take(writers.len())
        {
            empty(&dst)?;
            // A peer's run counts once its copy matches the source.
            let peer_run = |c: &mut Contender, run: Result<Duration, String>| match run
                .and_then(|took| verify(&src, &landed).map(|()| took).map_err(|(_, why)| why))
            {
                Ok(took) => {
                    c.record(w.goodput(bytes, took), Vec::new());
                    true
                }
                Err(why) => {
                    c.fail(&id, why);
                    false
                }
            };
            match writer {
                Writer::Amst => match amst_once(amst, place, &src, &dst, &work, within) {
                    Ok(r) => match verify(&src, &landed) {
                        Ok(()) => {
                            amst_c.record(w.goodput(bytes, r.elapsed), Vec::new());
                            if w == Workload::Sparse {
                                allocated[0].push(du_over_data(&landed, plan)?);
                                if let Some(sent) = r.data_bytes_sent {
                                    sent_over_data
                                        .push(sent as f64 / plan.sparse_data_bytes as f64);
                                }
                            }
                            if blast_streams.is_none() {
                                blast_streams = r.streams.filter(|n| *n > 0);
                            }
                        }
                        Err((n, why)) => {
                            *mismatched += n;
                            amst_c.fail(&id, why);
                        }
                    },
                    Err(e) => amst_c.fail(&id, e),
                },
                Writer::Rsync => {
                    let run = daemon.send(place, w.rsync_flags(), &src, &work, within);
                    if peer_run(&mut rsync_c, run) && w == Workload::Sparse {
                        allocated[1].push(du_over_data(&landed, plan)?);
                    }
                }
                Writer::TarNc => {
                    let run = tar_nc_once(place, w.tar_flags(), &src, &dst, &work, within);
                    if peer_run(&mut tar_c, run) && w == Workload::Sparse {
                        allocated[2].push(du_over_data(&landed, plan)?);
                    }
                }
                Writer::Cp => {
                    if let Some(c) = cp_c.as_mut() {
                        peer_run(c, cp_once(&src, &dst, &work, within));
                    }
                }
            }
        }
        // amst-tcp's blast loop: the transport's ceiling, with amst's stream count. It writes
        // no file, and the last copy stays meanwhile.
        if let Some(b) = blast_c.as_mut() {
            // amst's datacenter default, until a run of amst has said what it used.
            let streams = blast_streams.unwrap_or(64);
            if round == 0 {
                s.notes.push(format!(
                    "large: the blast contender used {streams} streams ({})",
                    if blast_streams.is_some() {
                        "the most amst send's --json report showed"
                    } else {
                        "amst send gave no stream count; amst's datacenter default"
                    }
                ));
            }
            match blast_once(streams, plan.large_bytes) {
                Ok(took) => b.record(w.goodput(bytes, took), Vec::new()),
                Err(e) => b.fail(&id, e),
            }
        }
    }
    drop(daemon);
    let _ = std::fs::remove_dir_all(&src_dir);
    let _ = std::fs::remove_dir_all(&dst);
    let median = |c: &Contender| c.summary().map(|m| m.median);
    if let Some(a) = median(&amst_c) {
        let peers = [
            Some(&rsync_c),
            Some(&tar_c),
            blast_c.as_ref(),
            cp_c.as_ref(),
        ];
        for (peer, suffix) in peers.into_iter().zip(["rsync", "tar_nc", "blast", "cp"]) {
            if let Some(p) = peer
                && let Some(pm) = median(p)
            {
                s.insert_ratio(format!("{key}_amst_over_{suffix}"), a, &p.name, pm);
            }
        }
        if w == Workload::Wan {
            s.metrics.insert(
                "wan_amst_fraction_of_link".into(),
                a / (WAN_RATE as f64 / 1e6),
            );
        }
    }
    if w == Workload::Sparse {
        // The worst run: one copy that lost its holes is one too many.
        let worst = |v: &[f64]| v.iter().copied().reduce(f64::max);
        for (v, who) in allocated.iter().zip(["amst", "rsync", "tar_nc"]) {
            if let Some(x) = worst(v) {
                s.metrics
                    .insert(format!("sparse_{who}_allocated_over_data"), x);
            }
        }
        if let Some(x) = worst(&sent_over_data) {
            s.metrics.insert("sparse_amst_sent_over_data".into(), x);
        }
    }
    s.contenders.extend(
        [Some(amst_c), Some(rsync_c), Some(tar_c), blast_c, cp_c]
            .into_iter()
            .flatten(),
    );
    Ok(())
}

/// The contenders that write a copy at the receiver, in the order of a round's rotation.
#[derive(Clone, Copy, Debug)]
enum Writer {
    Amst,
    Rsync,
    TarNc,
    Cp,
}

/// Compares the receiver's copy with the source: `Err` with the count of differing files
/// and the first few.
fn verify(src: &Path, landed: &Path) -> Result<(), (usize, String)> {
    match tree::differences(src, landed) {
        Ok(d) if d.is_empty() => Ok(()),
        Ok(d) => Err((
            d.len(),
            format!(
                "the copy differs from the source in {} files: {}",
                d.len(),
                d[..d.len().min(3)].join("; ")
            ),
        )),
        Err(e) => Err((1, format!("comparing {}: {e}", landed.display()))),
    }
}

fn du_over_data(landed: &Path, plan: &FilesPlan) -> Result<f64, String> {
    tree::allocated(landed)
        .map(|a| a as f64 / plan.sparse_data_bytes as f64)
        .map_err(|e| format!("{}: {e}", landed.display()))
}

/// Empties `dir` (the destination between runs), keeping the directory itself.
fn empty(dir: &Path) -> Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for e in entries.flatten() {
        let p = e.path();
        let r = if p.is_dir() && !p.is_symlink() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.map_err(|e| format!("emptying {}: {e}", p.display()))?;
    }
    Ok(())
}

fn wan_link() -> Result<LinkEm, String> {
    let bdp = WAN_RATE / 8 * WAN_RTT.as_millis() as u64 / 1000;
    LinkEm::builder()
        .rate_bps(WAN_RATE)
        .rtt(WAN_RTT)
        .loss(0.01)
        .queue_bytes(bdp)
        .start()
        .map_err(|e| format!("could not start the emulated link: {e}"))
}

/// Sets the sending namespace's default TCP congestion control to BBR (the namespace is the
/// link's own), so that rsync and `tar | nc`, which cannot pick one per socket, get the best
/// the kernel has; returns the note for the report.
fn sender_bbr(link: &LinkEm) -> String {
    let path = "/proc/sys/net/ipv4/tcp_congestion_control";
    match link.left().run(|| std::fs::write(path, "bbr")) {
        Ok(()) => "wan: the sending namespace's default TCP congestion control is bbr".into(),
        Err(e) => format!(
            "wan: could not make bbr the sending namespace's default ({e}); rsync and tar | nc used the kernel default"
        ),
    }
}

/// The tmpfs both ends of every transfer use: its own mount when root (removed when
/// dropped), else a directory in `/dev/shm`.
#[derive(Debug)]
struct Scratch {
    root: PathBuf,
    mounted: bool,
    note: String,
}

impl Scratch {
    fn new(bytes: u64) -> Result<Scratch, String> {
        let name = format!("amst-files-bench-{}", std::process::id());
        let mine = std::env::temp_dir().join(&name);
        if is_root() {
            std::fs::create_dir_all(&mine).map_err(|e| format!("{}: {e}", mine.display()))?;
            let mounted = Command::new("mount")
                .args(["-t", "tmpfs", "-o"])
                .arg(format!("size={bytes},mode=0700"))
                .arg("amst-files-bench")
                .arg(&mine)
                .output();
            match mounted {
                Ok(o) if o.status.success() => {
                    return Ok(Scratch {
                        note: format!(
                            "source and destination on a tmpfs of {} MiB mounted for the run",
                            bytes >> 20
                        ),
                        root: mine,
                        mounted: true,
                    });
                }
                Ok(o) => eprintln!(
                    "files: mounting a tmpfs on {} failed ({}); using /dev/shm",
                    mine.display(),
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => eprintln!("files: could not run mount ({e}); using /dev/shm"),
            }
            let _ = std::fs::remove_dir(&mine);
        }
        let shm = Path::new("/dev/shm").join(&name);
        std::fs::create_dir_all(&shm).map_err(|e| format!("{}: {e}", shm.display()))?;
        Ok(Scratch {
            root: shm,
            mounted: false,
            note: "source and destination in /dev/shm (tmpfs)".into(),
        })
    }

    /// A directory under the scratch root, created if missing.
    fn dir(&self, name: &str) -> Result<PathBuf, String> {
        let d = self.root.join(name);
        std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
        Ok(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.mounted {
            match Command::new("umount").arg(&self.root).output() {
                Ok(o) if o.status.success() => {
                    let _ = std::fs::remove_dir(&self.root);
                }
                _ => eprintln!(
                    "files: could not unmount {}; unmount it by hand",
                    self.root.display()
                ),
            }
        } else {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1).map(|euid| euid == "0"))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_have_room_for_holes_and_the_full_one_is_the_issues() {
        let full = FilesPlan::full(1.0);
        assert_eq!(full.large_bytes, 4 << 30);
        assert_eq!(full.small_files, 10_000);
        assert_eq!(
            (full.sparse_bytes, full.sparse_data_bytes),
            (8 << 30, 512 << 20)
        );
        for plan in [full, FilesPlan::full(0.01), FilesPlan::quick()] {
            assert!(
                tree::sparse_layout(plan.sparse_bytes, plan.sparse_data_bytes).is_some(),
                "{plan:?}"
            );
            assert!(plan.tmpfs_bytes() > 2 * plan.large_bytes);
        }
    }

    #[test]
    fn a_missing_amst_binary_fails_the_scenario_naming_the_build_command() {
        let s = scenario(&FilesPlan::quick(), Path::new("/nonexistent/amst"));
        let why = s.failed.unwrap();
        assert!(why.contains("cargo build --release -p amst-cli"), "{why}");
    }
}
