//! `cargo xtask rdma-vm`: real RDMA tests without an RDMA NIC.
//!
//! Boots two small qemu VMs (TCG; this host's KVM does not boot stock kernels) running Debian's
//! stock kernel, which ships `rdma_rxe` (Soft-RoCE). Each VM puts an rxe device on its virtio
//! NIC; the NICs are joined by a qemu socket pair on loopback, with guest addresses in
//! 198.18.0.0/15. The rootfs (debootstrap, with rdma-core's user space) and a folder with the
//! host-built test binaries are shared in read-only over 9p.
//!
//! Everything it downloads is cached under `$AMST_RDMA_VM_CACHE`, else
//! `$XDG_CACHE_HOME/amst-rdma-vm`, else `target/rdma-vm`: never in the repository.
//!
//! In the guests it runs amst-rdma's `tests/vm.rs` and amst-hybrid's `tests/rdma_vm.rs` (built
//! on the host with CI's `--workspace --all-features` selection), then the bulk test again
//! under `netem loss 1%`, and prints the goodput ratio to `ib_send_bw`. A failed step makes
//! the command fail with the step's name and the guest's output tail (plus rxe's kernel
//! messages and counters); `.ci/run` runs it after `cargo xtask ci`.
//!
//! Flags: `--setup-only` (prepare the cache and stop), `--no-amst` (only the rxe,
//! ibv_rc_pingpong and ib_send_bw checks), `--keep` (keep the per-run share), `--timeout
//! SECONDS` (guest run limit, default 1500; CI passes 600), `--result PATH` (write the
//! measured goodputs as JSON for `cargo xtask bench --rdma`; a run that fails or measures
//! nothing writes no file).

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The Debian suite both the rootfs and the kernel come from.
const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";
/// Packages the guests need beyond minbase.
const GUEST_PACKAGES: &str =
    "kmod,iproute2,ibverbs-utils,ibverbs-providers,libibverbs1,rdma-core,perftest,procps";
/// Modules the initramfs loads before it can mount the 9p root, in the order given (their
/// dependencies are resolved from modules.dep and loaded first).
const INITRD_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_net",
    "virtio_blk",
    "9pnet_virtio",
    "9p",
    "ext4",
];
/// Test targets built on the host and run in both guests, in this order.
const VM_TEST_TARGETS: &[&str] = &["vm", "rdma_vm"];
/// Guest addresses: the benchmarking range, never routed anywhere.
const GUEST_IPS: [&str; 2] = ["198.18.0.1", "198.18.0.2"];

/// Entry point: `rdma_vm(&args[1..])` from xtask's main.
pub fn rdma_vm(args: &[String]) -> Result<(), String> {
    let opts = Opts::parse(args)?;
    if let Some(path) = &opts.result {
        // A failed run must not leave the previous run's numbers behind to be read as this one's.
        let _ = fs::remove_file(path);
    }
    let root = workspace_root()?;
    let cache = cache_dir(&root);
    fs::create_dir_all(&cache).map_err(|e| format!("creating {}: {e}", cache.display()))?;
    eprintln!("rdma-vm: cache in {}", cache.display());
    let started = Instant::now();

    // The in-VM tests are built with the `rdma` feature (cmake and libclang, for
    // rdma-mummy-sys); a bench machine set up for the bench alone lacked them.
    crate::setup::ensure(crate::setup::Need::CiAndRdma, false)?;
    ensure_host_tools()?;
    let kernel = ensure_kernel(&cache)?;
    let rootfs = ensure_rootfs(&cache, &kernel)?;
    let initrd = ensure_initrd(&cache, &kernel)?;
    eprintln!(
        "rdma-vm: setup ready after {:.0?} (kernel {})",
        started.elapsed(),
        kernel.version
    );
    if opts.setup_only {
        return Ok(());
    }

    let run = cache.join("run");
    let _ = fs::remove_dir_all(&run);
    let share = run.join("share");
    fs::create_dir_all(&share).map_err(|e| format!("creating {}: {e}", share.display()))?;
    let amst_tests = if opts.no_amst {
        Vec::new()
    } else {
        build_test_binaries(&root, &share)?
    };
    write_guest_script(&share, &amst_tests)?;

    let mut result = boot_pair(&kernel, &rootfs, &initrd, &run, &share, opts.timeout);
    if let Err(e) = &result
        && reference_failed(e)
    {
        // Once (2026-12-06) the guests never reached each other ("No route to host", no
        // packet in the rxe counters), and ib_send_bw, which is not ours, failed with amst's
        // tests; a second boot passed. When the reference fails too, the pair boots once more
        // and that run's result stands.
        eprintln!(
            "rdma-vm: ib_send_bw failed too, so the VMs' network is suspect; booting the pair once more. The first try:\n{e}"
        );
        result = boot_pair(&kernel, &rootfs, &initrd, &run, &share, opts.timeout);
    } else if let Err(e) = &result
        && let Some(role) = stalled_guest(&run)
    {
        // Once (2026-12-06, CI at ca44e18) the server guest's kernel stalled at boot under
        // TCG (RCU stalls from 22 s, "timer wakeup didn't happen") before any step ran, and
        // the client found no server; the same step run again passed. A guest kernel that
        // stalls is qemu's or the guest's, never amst's (our steps run in user space), so the
        // pair boots once more and that run's result stands.
        eprintln!(
            "rdma-vm: the {role} guest's kernel reported an RCU stall; booting the pair once more. The first try:\n{e}"
        );
        result = boot_pair(&kernel, &rootfs, &initrd, &run, &share, opts.timeout);
    }
    if !opts.keep && result.is_ok() {
        let _ = fs::remove_dir_all(&share);
    }
    eprintln!("rdma-vm: finished after {:.0?}", started.elapsed());
    let measured = result?;
    if let Some(path) = &opts.result {
        let m = measured.ok_or(
            "rdma-vm: --result: no amst goodput and ib_send_bw pair was measured (--no-amst?)",
        )?;
        m.write(path, started.elapsed())?;
        eprintln!("rdma-vm: result in {}", path.display());
    }
    Ok(())
}

/// The goodputs one run measured, in Gbit/s: amst-rdma's 256 MiB bulk test and ib_send_bw.
#[derive(Debug)]
struct Measured {
    amst: f64,
    ib_send_bw: f64,
    /// Every reading behind those two, `(what, guest role, Gbit/s)`: both ends of the one
    /// ib_send_bw transfer report its bandwidth.
    readings: Vec<(&'static str, &'static str, f64)>,
}

impl Measured {
    /// Writes the JSON that amst-e2e's `--rdma-result` reads.
    fn write(&self, path: &Path, took: Duration) -> Result<(), String> {
        // JSON has no inf or NaN (a zero ib_send_bw reading would give both).
        let num = |v: f64| {
            if v.is_finite() {
                v.to_string()
            } else {
                "null".to_string()
            }
        };
        let samples: Vec<String> = self
            .readings
            .iter()
            .map(|(what, role, g)| {
                let g = num(*g);
                format!(r#"{{"what": "{what}", "role": "{role}", "gbps": {g}}}"#)
            })
            .collect();
        let json = format!(
            "{{\n  \"amst_gbps\": {},\n  \"ib_send_bw_gbps\": {},\n  \"ratio\": {},\n  \
             \"seconds\": {:.1},\n  \"samples\": [\n    {}\n  ]\n}}\n",
            num(self.amst),
            num(self.ib_send_bw),
            num(self.amst / self.ib_send_bw),
            took.as_secs_f64(),
            samples.join(",\n    ")
        );
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        }
        fs::write(path, json).map_err(|e| format!("writing {}: {e}", path.display()))
    }
}

/// `text` as a JSON string literal, for the error file `cargo xtask bench --rdma` writes when
/// the VM run fails (xtask has no dependencies, so no serde).
pub fn json_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[derive(Debug)]
struct Opts {
    setup_only: bool,
    no_amst: bool,
    keep: bool,
    timeout: Duration,
    result: Option<PathBuf>,
}

impl Opts {
    fn parse(args: &[String]) -> Result<Self, String> {
        let mut o = Opts {
            setup_only: false,
            no_amst: false,
            keep: false,
            timeout: Duration::from_secs(1500),
            result: None,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--setup-only" => o.setup_only = true,
                "--no-amst" => o.no_amst = true,
                "--keep" => o.keep = true,
                "--timeout" => {
                    let v = it.next().ok_or("--timeout needs SECONDS")?;
                    let s: u64 = v.parse().map_err(|_| format!("bad --timeout {v}"))?;
                    o.timeout = Duration::from_secs(s);
                }
                "--result" => {
                    let v = it.next().ok_or("--result needs PATH")?;
                    o.result = Some(PathBuf::from(v));
                }
                other => {
                    return Err(format!(
                        "rdma-vm: unknown argument {other}; use --setup-only, --no-amst, --keep, --timeout SECONDS, --result PATH"
                    ));
                }
            }
        }
        Ok(o)
    }
}

fn workspace_root() -> Result<PathBuf, String> {
    let here = std::env::var("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .or_else(|_| std::env::current_dir())
        .map_err(|e| format!("finding the workspace: {e}"))?;
    Ok(if here.ends_with("xtask") {
        here.parent().map(Path::to_path_buf).unwrap_or(here)
    } else {
        here
    })
}

fn cache_dir(root: &Path) -> PathBuf {
    if let Some(p) = std::env::var_os("AMST_RDMA_VM_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("amst-rdma-vm");
    }
    root.join("target").join("rdma-vm")
}

/// Runs a command with a time limit; its output goes to `log` when given, else inherits.
fn run_bounded(cmd: &mut Command, limit: Duration, what: &str) -> Result<(), String> {
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("{what}: cannot start {:?}: {e}", cmd.get_program()))?;
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => return Ok(()),
            Ok(Some(st)) => return Err(format!("{what}: failed with {st}")),
            Ok(None) if start.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{what}: timed out after {limit:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return Err(format!("{what}: {e}")),
        }
    }
}

fn output_bounded(cmd: &mut Command, limit: Duration, what: &str) -> Result<String, String> {
    let tmp = std::env::temp_dir().join(format!("amst-rdma-vm-{}.out", std::process::id()));
    let f = fs::File::create(&tmp).map_err(|e| format!("{what}: {e}"))?;
    cmd.stdout(f);
    let r = run_bounded(cmd, limit, what);
    let out = fs::read_to_string(&tmp).unwrap_or_default();
    let _ = fs::remove_file(&tmp);
    r.map(|()| out)
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool} >/dev/null 2>&1")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn apt_install(args: &[&str]) -> Result<(), String> {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(args);
    run_bounded(&mut cmd, Duration::from_secs(900), "apt-get install")
}

/// qemu-system-x86 must match the host's qemu-utils from bookworm-backports.
fn ensure_host_tools() -> Result<(), String> {
    let backports = Path::new("/etc/apt/sources.list.d/bookworm-backports.sources");
    let mut missing_qemu = !have("qemu-system-x86_64");
    let others: Vec<&str> = [
        ("debootstrap", "debootstrap"),
        ("busybox", "busybox-static"),
        ("cpio", "cpio"),
        ("xz", "xz-utils"),
        ("depmod", "kmod"),
    ]
    .iter()
    .filter(|(tool, _)| !have(tool))
    .map(|(_, pkg)| *pkg)
    .collect();
    if !missing_qemu && others.is_empty() {
        return Ok(());
    }
    if missing_qemu && !backports.exists() {
        let has_any = Command::new("sh")
            .args([
                "-c",
                "grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/",
            ])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !has_any {
            eprintln!("rdma-vm: adding the bookworm-backports apt source");
            fs::write(
                backports,
                "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
            )
            .map_err(|e| format!("writing {}: {e}", backports.display()))?;
        }
    }
    run_bounded(
        Command::new("apt-get").args(["update", "-q"]),
        Duration::from_secs(300),
        "apt-get update",
    )?;
    if missing_qemu {
        apt_install(&["-t", "bookworm-backports", "qemu-system-x86"])?;
        missing_qemu = !have("qemu-system-x86_64");
    }
    if !others.is_empty() {
        apt_install(&others)?;
    }
    if missing_qemu {
        return Err("qemu-system-x86_64 still missing after apt-get install".into());
    }
    Ok(())
}

#[derive(Debug)]
struct Kernel {
    version: String,
    /// The unpacked package: boot/vmlinuz-*, lib/modules/*.
    tree: PathBuf,
}

impl Kernel {
    fn vmlinuz(&self) -> PathBuf {
        self.tree.join(format!("boot/vmlinuz-{}", self.version))
    }
    fn modules(&self) -> PathBuf {
        self.tree.join(format!("lib/modules/{}", self.version))
    }
}

/// Debian's 6.1 kernel (the bookworm one, not backports), unpacked and depmod'ed.
fn ensure_kernel(cache: &Path) -> Result<Kernel, String> {
    let dir = cache.join("kernel");
    let stamp = dir.join("version");
    if let Ok(v) = fs::read_to_string(&stamp) {
        let k = Kernel {
            version: v.trim().to_string(),
            tree: dir.join("tree"),
        };
        if k.vmlinuz().exists() {
            return Ok(k);
        }
    }
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let show = || {
        output_bounded(
            Command::new("apt-cache").args(["show", &format!("linux-image-amd64/{SUITE}")]),
            Duration::from_secs(60),
            "apt-cache show linux-image-amd64",
        )
        .or_else(|_| {
            output_bounded(
                Command::new("apt-cache").args(["show", "linux-image-amd64"]),
                Duration::from_secs(60),
                "apt-cache show linux-image-amd64",
            )
        })
        .ok()
        .filter(|out| out.contains("linux-image-6.1.0-"))
    };
    // A fresh machine may have no package lists at all (container images drop them).
    let show = match show() {
        Some(out) => out,
        None => {
            run_bounded(
                Command::new("apt-get").args(["update", "-q"]),
                Duration::from_secs(300),
                "apt-get update",
            )?;
            show().ok_or("apt-cache knows no linux-image-amd64 depending on a 6.1 kernel")?
        }
    };
    // Pick the 6.1 image the meta package points at (the backports one is newer).
    let pkg = show
        .lines()
        .filter_map(|l| l.strip_prefix("Depends: "))
        .flat_map(|d| d.split([',', ' ']))
        .find(|w| w.starts_with("linux-image-6.1.0-") && w.ends_with("-amd64"))
        .ok_or("no linux-image-6.1.0-*-amd64 found via apt-cache show linux-image-amd64")?
        .to_string();
    eprintln!("rdma-vm: downloading {pkg}");
    let mut dl = Command::new("apt-get");
    dl.args(["download", &pkg]).current_dir(&dir);
    run_bounded(&mut dl, Duration::from_secs(600), "apt-get download kernel")?;
    let deb = fs::read_dir(&dir)
        .map_err(|e| e.to_string())?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or("apt-get download produced no .deb")?;
    let tree = dir.join("tree");
    run_bounded(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree),
        Duration::from_secs(300),
        "dpkg-deb -x kernel",
    )?;
    let version = pkg
        .strip_prefix("linux-image-")
        .map(str::to_string)
        .ok_or("odd kernel package name")?;
    run_bounded(
        Command::new("depmod").arg("-b").arg(&tree).arg(&version),
        Duration::from_secs(300),
        "depmod -b",
    )?;
    let _ = fs::remove_file(&deb);
    fs::write(&stamp, &version).map_err(|e| e.to_string())?;
    let k = Kernel { version, tree };
    if !k.vmlinuz().exists() {
        return Err(format!("{} missing after unpacking", k.vmlinuz().display()));
    }
    Ok(k)
}

/// A minbase bookworm with rdma-core's user space and the kernel's modules.
fn ensure_rootfs(cache: &Path, kernel: &Kernel) -> Result<PathBuf, String> {
    let rootfs = cache.join("rootfs");
    let stamp = cache.join("rootfs.done");
    if !stamp.exists() {
        let _ = fs::remove_dir_all(&rootfs);
        eprintln!("rdma-vm: debootstrap {SUITE} (a few minutes, once)");
        run_bounded(
            Command::new("debootstrap")
                .arg("--variant=minbase")
                .arg(format!("--include={GUEST_PACKAGES}"))
                .arg(SUITE)
                .arg(&rootfs)
                .arg(MIRROR)
                .stdout(Stdio::null()),
            Duration::from_secs(1200),
            "debootstrap",
        )?;
        let _ = fs::remove_dir_all(rootfs.join("var/cache/apt/archives"));
        fs::write(&stamp, "ok").map_err(|e| e.to_string())?;
    }
    // The guest's modprobe needs the modules of the kernel it runs.
    let dst = rootfs.join("lib/modules").join(&kernel.version);
    if !dst.join("modules.dep").exists() {
        fs::create_dir_all(rootfs.join("lib/modules")).map_err(|e| e.to_string())?;
        run_bounded(
            Command::new("cp").arg("-a").arg(kernel.modules()).arg(&dst),
            Duration::from_secs(300),
            "copying modules into the rootfs",
        )?;
    }
    for d in ["mnt/amst", "tmp", "run"] {
        fs::create_dir_all(rootfs.join(d)).map_err(|e| e.to_string())?;
    }
    Ok(rootfs)
}

/// Resolves `wanted` modules and their dependencies from modules.dep, dependencies first;
/// built-in ones are skipped.
fn resolve_modules(kernel: &Kernel, wanted: &[&str]) -> Result<Vec<String>, String> {
    let mdir = kernel.modules();
    let dep = fs::read_to_string(mdir.join("modules.dep")).map_err(|e| e.to_string())?;
    let builtin = fs::read_to_string(mdir.join("modules.builtin")).unwrap_or_default();
    let name_of = |path: &str| -> String {
        let file = path.rsplit('/').next().unwrap_or(path);
        let stem = file.split(".ko").next().unwrap_or(file);
        stem.replace('-', "_")
    };
    let mut table = std::collections::HashMap::new();
    for line in dep.lines() {
        if let Some((m, deps)) = line.split_once(':') {
            let deps: Vec<String> = deps.split_whitespace().map(str::to_string).collect();
            table.insert(name_of(m), (m.to_string(), deps));
        }
    }
    let builtin: std::collections::HashSet<String> = builtin.lines().map(name_of).collect();
    let mut order = Vec::new();
    fn visit(
        path: &str,
        table: &std::collections::HashMap<String, (String, Vec<String>)>,
        order: &mut Vec<String>,
        name_of: &dyn Fn(&str) -> String,
    ) {
        if order.iter().any(|p| p == path) {
            return;
        }
        if let Some((_, deps)) = table.get(&name_of(path)) {
            // modules.dep lists the full closure, deepest last.
            for d in deps.iter().rev() {
                visit(d, table, order, name_of);
            }
        }
        order.push(path.to_string());
    }
    for w in wanted {
        let key = w.replace('-', "_");
        if builtin.contains(&key) {
            continue;
        }
        let (path, _) = table
            .get(&key)
            .ok_or_else(|| format!("module {w} is neither built in nor in modules.dep"))?;
        visit(path, &table, &mut order, &name_of);
    }
    Ok(order)
}

/// A busybox initramfs that loads the virtio and 9p modules and switches to the 9p rootfs.
fn ensure_initrd(cache: &Path, kernel: &Kernel) -> Result<PathBuf, String> {
    let out = cache.join(format!("initrd-{}.cpio.gz", kernel.version));
    if out.exists() {
        return Ok(out);
    }
    let dir = cache.join("initrd-tree");
    let _ = fs::remove_dir_all(&dir);
    for d in ["bin", "sbin", "proc", "sys", "dev", "newroot", "modules"] {
        fs::create_dir_all(dir.join(d)).map_err(|e| e.to_string())?;
    }
    let busybox = String::from_utf8_lossy(
        &Command::new("sh")
            .args(["-c", "command -v busybox"])
            .output()
            .map_err(|e| e.to_string())?
            .stdout,
    )
    .trim()
    .to_string();
    fs::copy(&busybox, dir.join("bin/busybox")).map_err(|e| format!("copying busybox: {e}"))?;
    let mut load = String::new();
    for rel in resolve_modules(kernel, INITRD_MODULES)? {
        let src = kernel.modules().join(&rel);
        let file = rel.rsplit('/').next().unwrap_or(&rel).to_string();
        if let Some(plain) = file.strip_suffix(".xz") {
            let data = Command::new("xz")
                .args(["-dc"])
                .arg(&src)
                .output()
                .map_err(|e| e.to_string())?;
            fs::write(dir.join("modules").join(plain), data.stdout).map_err(|e| e.to_string())?;
            load.push_str(&format!("insmod /modules/{plain} 2>/dev/null\n"));
        } else {
            fs::copy(&src, dir.join("modules").join(&file)).map_err(|e| e.to_string())?;
            load.push_str(&format!("insmod /modules/{file} 2>/dev/null\n"));
        }
    }
    let init = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         mount -t proc proc /proc\nmount -t sysfs sysfs /sys\nmount -t devtmpfs dev /dev\n\
         {load}\
         if ! mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose rootfs /newroot; then\n\
           echo AMST-VM-FATAL cannot mount the 9p rootfs; poweroff -f\nfi\n\
         mount --move /dev /newroot/dev\n\
         umount /proc /sys\n\
         exec switch_root /newroot /bin/sh /mnt/amst-boot.sh\n"
    );
    let init_path = dir.join("init");
    fs::write(&init_path, init).map_err(|e| e.to_string())?;
    run_bounded(
        Command::new("chmod").arg("+x").arg(&init_path),
        Duration::from_secs(10),
        "chmod",
    )?;
    // The boot script lives in the rootfs because the share is not mounted yet when it starts.
    let tmp = out.with_extension("tmp");
    run_bounded(
        Command::new("sh").arg("-c").arg(format!(
            "cd '{}' && find . | cpio -o -H newc --quiet | gzip -1 > '{}'",
            dir.display(),
            tmp.display()
        )),
        Duration::from_secs(120),
        "building the initramfs",
    )?;
    fs::rename(&tmp, &out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// Builds the in-VM test targets (`vm` of amst-rdma, `rdma_vm` of amst-hybrid) with the same
/// `--workspace --all-features` selection as `cargo xtask ci`, so that CI reuses its build
/// instead of compiling the dependencies again with other features; then copies the test
/// executables into the share. Returns their names.
fn build_test_binaries(root: &Path, share: &Path) -> Result<Vec<String>, String> {
    eprintln!("rdma-vm: building the in-VM tests (amst-rdma vm, amst-hybrid rdma_vm)");
    let out = output_bounded(
        Command::new("cargo")
            .current_dir(root)
            .args([
                "test",
                "--workspace",
                "--all-features",
                "--no-run",
                "--message-format=json",
            ])
            .args(VM_TEST_TARGETS.iter().flat_map(|t| ["--test", t]))
            .stderr(Stdio::inherit()),
        Duration::from_secs(1800),
        "building the in-VM test binaries",
    )?;
    let mut names = Vec::new();
    for line in out.lines() {
        if !line.contains("\"executable\":\"") || !line.contains("\"test\":true") {
            continue;
        }
        let exe = line
            .split("\"executable\":\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap_or_default();
        if exe.is_empty() {
            continue;
        }
        let src = PathBuf::from(exe);
        let name = src
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        fs::copy(&src, share.join(&name)).map_err(|e| format!("copying {exe}: {e}"))?;
        names.push(name);
    }
    if names.is_empty() {
        return Err("cargo built no in-VM test executable".into());
    }
    Ok(names)
}

/// The per-run guest script: network, rxe, the checks, then the in-VM tests.
fn write_guest_script(share: &Path, tests: &[String]) -> Result<(), String> {
    let mut amst = String::new();
    let env = "env AMST_RDMA_ROLE=$ROLE AMST_RDMA_PEER=$PEER AMST_RDMA_DEVICE=rxe0";
    let target_of = |name: &str| name.rsplit_once('-').map_or(name, |(t, _)| t).to_string();
    for target in VM_TEST_TARGETS {
        // Every test binary runs on both sides; role and peer come from the environment.
        for t in tests.iter().filter(|t| target_of(t) == *target) {
            amst.push_str(&format!(
                "step \"{target} ({t})\" 400 {env} /mnt/amst/{t} --test-threads 1 --nocapture\n"
            ));
        }
    }
    if let Some(vm) = tests.iter().find(|t| target_of(t) == "vm") {
        // The bulk test again over a lossy link (netem in the guest kernel). Its port (18_501
        // shifted by 300) must differ from every earlier step's: the two guests move on
        // independently, so this client can dial while the server still runs the hybrid
        // test, whose RDMA bootstrap listens on 18_601 with another key (a collision there
        // failed the handshake as "authentication failed").
        amst.push_str(&format!(
            "step \"netem loss 1%\" 30 tc qdisc add dev eth0 root netem loss 1%\n\
             step \"vm bulk under netem loss 1%\" 300 {env} AMST_RDMA_BULK_MIB=16 AMST_RDMA_PORT_SHIFT=300 \
             /mnt/amst/{vm} --test-threads 1 --nocapture t1_bulk\n\
             tc qdisc del dev eth0 root 2>/dev/null\n"
        ));
    }
    let script = format!(
        r#"#!/bin/sh
# Runs inside each guest. Prints AMST-STEP lines that the host parses; a failed step is
# followed by its output tail, the kernel's rxe messages and the rxe counters. (rxe's
# dynamic debug is not turned on: it logs every packet, which slows TCG guests into
# retry-exceeded errors.)
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
ROLE=$1; ME=$2; PEER=$3
step() {{ name=$1; limit=$2; shift 2
  if timeout "$limit" "$@" > /tmp/step.log 2>&1; then echo "AMST-STEP ok $name"; sed 's/^/    /' /tmp/step.log | tail -n 40
  else rc=$?; [ $rc = 124 ] && why="timed out after ${{limit}}s" || why="exit $rc"
    echo "AMST-STEP fail($why) $name"; sed 's/^/    /' /tmp/step.log | tail -n 60
    echo "    --- kernel (rxe) ---"; dmesg | grep -i -e rxe -e rdma | tail -n 30 | sed 's/^/    /'
    echo "    --- rxe counters ---"; rdma statistic show link rxe0/1 2>&1 | sed 's/^/    /'
  fi; }}
ip link set lo up
ip link set eth0 mtu 4200 2>/dev/null || true
ip addr add $ME/24 dev eth0
ip link set eth0 up
step "modprobe rdma_rxe" 60 modprobe rdma_rxe
step "rdma link add" 30 rdma link add rxe0 type rxe netdev eth0
i=0; while [ $i -lt 100 ] && ! ibv_devinfo -d rxe0 2>/dev/null | grep -q PORT_ACTIVE; do sleep 0.2; i=$((i+1)); done
if ibv_devinfo -d rxe0 2>/dev/null | grep -q PORT_ACTIVE; then echo "AMST-STEP ok rxe0 ACTIVE"; else echo "AMST-STEP fail rxe0 ACTIVE"; fi
rdma link show
GID=$(for g in /sys/class/infiniband/rxe0/ports/1/gids/*; do i=${{g##*/}}; t=$(cat /sys/class/infiniband/rxe0/ports/1/gid_attrs/types/$i 2>/dev/null); v=$(cat $g); case "$t:$v" in "RoCE v2:0000:0000:0000:0000:0000:ffff:"*) echo $i; break;; esac; done)
echo "AMST-INFO roce-v2 ipv4 gid index ${{GID:-none}}"
i=0; while [ $i -lt 150 ] && ! ping -c1 -W1 $PEER >/dev/null 2>&1; do i=$((i+1)); done
if [ "$ROLE" = server ]; then
  step "ibv_rc_pingpong" 120 ibv_rc_pingpong -d rxe0 -g ${{GID:-1}} -n 20
  step "ib_send_bw" 180 ib_send_bw -d rxe0 -x ${{GID:-1}} -s 65536 -n 1000 -F --report_gbits
else
  sleep 3
  step "ibv_rc_pingpong" 120 ibv_rc_pingpong -d rxe0 -g ${{GID:-1}} -n 20 $PEER
  sleep 3
  step "ib_send_bw" 180 ib_send_bw -d rxe0 -x ${{GID:-1}} -s 65536 -n 1000 -F --report_gbits $PEER
  sleep 2
fi
{amst}echo "    --- rxe counters at the end ---"; rdma statistic show link rxe0/1 2>&1 | sed 's/^/    /'
echo AMST-DONE
"#
    );
    fs::write(share.join("guest.sh"), script).map_err(|e| e.to_string())
}

/// The boot script in the rootfs: tmpfs for writable places, the share, then guest.sh.
fn write_boot_script(rootfs: &Path) -> Result<(), String> {
    let boot = r#"#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys
mount -t tmpfs tmp /tmp; mount -t tmpfs run /run; mount -t tmpfs var /var/tmp 2>/dev/null
mount -t 9p -o trans=virtio,version=9p2000.L,ro amst /mnt/amst || echo "AMST-STEP fail mount share"
for a in $(cat /proc/cmdline); do case $a in amst.role=*) ROLE=${a#*=};; amst.me=*) ME=${a#*=};; amst.peer=*) PEER=${a#*=};; esac; done
sh /mnt/amst/guest.sh $ROLE $ME $PEER 2>&1
echo o > /proc/sysrq-trigger
sleep 5; poweroff -f
"#;
    fs::write(rootfs.join("mnt/amst-boot.sh"), boot).map_err(|e| e.to_string())
}

/// Kills the qemu processes it owns when dropped, so no VM outlives the harness.
struct Vms(Vec<(String, Child)>);

impl Drop for Vms {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Whether a failed run's report shows the reference tool, ib_send_bw, failing too.
fn reference_failed(report: &str) -> bool {
    report
        .lines()
        .any(|l| l.contains(": step fail") && l.trim_end().ends_with(" ib_send_bw"))
}

/// The role of the first guest whose console shows its kernel stalled (an RCU stall report).
fn stalled_guest(run: &Path) -> Option<&'static str> {
    ["server", "client"].into_iter().find(|role| {
        fs::read_to_string(run.join(format!("{role}.log")))
            .is_ok_and(|console| shows_kernel_stall(&console))
    })
}

fn shows_kernel_stall(console: &str) -> bool {
    console.lines().any(|l| {
        l.contains("rcu")
            && (l.contains("detected stall") || l.contains("timer wakeup didn't happen"))
    })
}

fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

fn boot_pair(
    kernel: &Kernel,
    rootfs: &Path,
    initrd: &Path,
    run: &Path,
    share: &Path,
    limit: Duration,
) -> Result<Option<Measured>, String> {
    write_boot_script(rootfs)?;
    let port = free_port()?;
    let mut vms = Vms(Vec::new());
    for (i, role) in ["server", "client"].iter().enumerate() {
        let nic = if i == 0 {
            format!(
                "socket,model=virtio-net-pci,mac=52:54:00:a5:00:0{},listen=127.0.0.1:{port}",
                i + 1
            )
        } else {
            format!(
                "socket,model=virtio-net-pci,mac=52:54:00:a5:00:0{},connect=127.0.0.1:{port}",
                i + 1
            )
        };
        let console = run.join(format!("{role}.log"));
        let append = format!(
            "console=ttyS0 panic=-1 quiet loglevel=4 amst.role={role} amst.me={} amst.peer={}",
            GUEST_IPS[i],
            GUEST_IPS[1 - i]
        );
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "2048"])
            .args(["-display", "none", "-monitor", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-kernel")
            .arg(kernel.vmlinuz())
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", &append])
            .args(["-nic", &nic])
            .arg("-virtfs")
            .arg(format!(
                "local,path={},mount_tag=rootfs,security_model=none,readonly=on",
                rootfs.display()
            ))
            .arg("-virtfs")
            .arg(format!(
                "local,path={},mount_tag=amst,security_model=none,readonly=on",
                share.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                fs::File::create(run.join(format!("{role}.qemu.err")))
                    .map_err(|e| e.to_string())?,
            );
        let child = cmd.spawn().map_err(|e| format!("starting qemu: {e}"))?;
        vms.0.push((role.to_string(), child));
        if i == 0 {
            // The connecting side fails if the listener is not up yet.
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    eprintln!("rdma-vm: two VMs booting (logs in {})", run.display());
    let start = Instant::now();
    let mut done = [false, false];
    while !(done[0] && done[1]) {
        if start.elapsed() > limit {
            break;
        }
        for (i, (_, c)) in vms.0.iter_mut().enumerate() {
            if !done[i] && matches!(c.try_wait(), Ok(Some(_))) {
                done[i] = true;
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let timed_out = !(done[0] && done[1]);
    drop(vms);
    let mut failures = Vec::new();
    let mut ib_send_bw: Option<f64> = None;
    let mut amst_goodput: Option<f64> = None;
    let mut readings = Vec::new();
    for role in ["server", "client"] {
        let log = run.join(format!("{role}.log"));
        let text = fs::read_to_string(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let lines: Vec<&str> = text.lines().collect();
        let mut finished = false;
        let mut out = std::io::stderr().lock();
        for (i, line) in lines.iter().enumerate() {
            if i > 0 && lines[i - 1].contains("BW average[Gb/sec]") {
                let _ = writeln!(out, "[{role}] ib_send_bw: {}", line.trim());
                // "#bytes #iterations peak average msgrate"
                if let Some(avg) = line
                    .split_whitespace()
                    .nth(3)
                    .and_then(|v| v.parse::<f64>().ok())
                {
                    // Both ends report the one transfer; under TCG one end's clock sometimes
                    // yields all zeros, so the higher reading is the measurement (a zero from
                    // both stays zero, and the ratio then reads as missing, not infinite).
                    ib_send_bw = Some(ib_send_bw.map_or(avg, |b: f64| b.max(avg)));
                    readings.push(("ib_send_bw", role, avg));
                }
            }
            if let Some(rest) = line.strip_prefix("AMST-STEP ") {
                let _ = writeln!(out, "[{role}] {rest}");
                if !rest.starts_with("ok ") {
                    // The guest prints the step's output tail indented right behind it.
                    let tail: Vec<&str> = lines[i + 1..]
                        .iter()
                        .take_while(|l| l.starts_with("    ") || l.is_empty())
                        .copied()
                        .collect();
                    failures.push(format!(
                        "{role}: step {rest}\n      guest output (tail):\n{}",
                        indent(&tail)
                    ));
                }
            } else if line.contains("AMST-INFO")
                || line.contains("test result")
                || line.contains("panicked")
            {
                let _ = writeln!(out, "[{role}] {}", line.trim());
                if let Some(g) = line
                    .split("amst goodput ")
                    .nth(1)
                    .filter(|_| line.contains("(256 MiB"))
                    .and_then(|r| r.split_whitespace().next())
                    .and_then(|v| v.parse::<f64>().ok())
                {
                    amst_goodput = Some(g);
                    readings.push(("amst goodput", role, g));
                }
            } else if line.starts_with("AMST-DONE") {
                finished = true;
            } else if line.starts_with("AMST-VM-FATAL") {
                failures.push(format!("{role}: {line}"));
            }
        }
        if !finished {
            let from = lines.len().saturating_sub(40);
            failures.push(format!(
                "{role}: guest script did not finish (full log {}); console tail:\n{}",
                log.display(),
                indent(&lines[from..])
            ));
        }
    }
    let mut measured = None;
    if let (Some(ib), Some(amst)) = (ib_send_bw, amst_goodput) {
        measured = Some(Measured {
            amst,
            ib_send_bw: ib,
            readings,
        });
        let ratio: f64 = amst / ib;
        eprintln!(
            "rdma-vm: goodput amst {amst:.4} Gb/s vs ib_send_bw {ib:.4} Gb/s: ratio {ratio:.2} (goal >= 0.5)"
        );
        if ratio < 0.5 {
            eprintln!("rdma-vm: warning: the goodput ratio is below the 0.5 goal");
        }
    }
    if timed_out {
        failures.push(format!("VMs still running after {limit:?}; killed"));
    }
    if failures.is_empty() {
        Ok(measured)
    } else {
        Err(format!("rdma-vm failed:\n  {}", failures.join("\n  ")))
    }
}

fn indent(lines: &[&str]) -> String {
    lines
        .iter()
        .map(|l| format!("      | {}", l.trim_end()))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::{reference_failed, shows_kernel_stall};

    #[test]
    fn an_rcu_stall_in_a_guest_console_counts_as_a_stalled_kernel() {
        let stalled = "[   22.1] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:\n[   22.2] rcu: rcu_preempt kthread timer wakeup didn't happen for 2502 jiffies!";
        assert!(shows_kernel_stall(stalled));
        let self_detected = "[   30.0] rcu: INFO: rcu_sched self-detected stall on CPU";
        assert!(shows_kernel_stall(self_detected));
        let healthy = "AMST-STEP ok vm (vm-4f46)\nrcu: Hierarchical RCU implementation.\nAMST-DONE";
        assert!(!shows_kernel_stall(healthy));
    }

    #[test]
    fn only_a_failed_ib_send_bw_step_marks_the_network_suspect() {
        let both = "rdma-vm failed:\n  server: step fail(timed out after 180s) ib_send_bw\n      guest output (tail):\n  client: step fail(timed out after 400s) vm (vm-4f46)";
        assert!(reference_failed(both));
        let ours = "rdma-vm failed:\n  client: step fail(exit 101) vm (vm-4f46)\n  server: step ok ib_send_bw";
        assert!(!reference_failed(ours));
        assert!(!reference_failed("VMs still running after 600s; killed"));
    }
}
