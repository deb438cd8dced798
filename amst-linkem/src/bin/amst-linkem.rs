//! `amst-linkem`: run commands on either side of an emulated WAN link.
//!
//! ```text
//! amst-linkem run --rate 200mbit --delay 25ms --loss 1% -- left: iperf3 -s -1 right: iperf3 -c 198.18.0.1
//! amst-linkem cleanup
//! amst-linkem bench
//! ```

use std::process::{Child, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use amst_linkem::{
    Direction, GilbertElliott, LinkEm, LinkParams, Namespace, Schedule, parse_duration,
    parse_probability, parse_queue, parse_rate,
};
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "amst-linkem",
    version,
    about = "A user-space WAN link emulator over TUN and network namespaces"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start the link and run commands in its namespaces.
    ///
    /// After `--`, `left:` and `right:` start a command in that namespace (198.18.0.1 and
    /// 198.18.0.2), e.g. `-- left: iperf3 -s -1 right: iperf3 -c 198.18.0.1 -t 10`.
    /// Commands start in the order given, `--stagger` apart. Without commands the link
    /// stays up until Ctrl-C; enter it with `ip netns exec <name> ...`.
    Run(Box<RunArgs>),
    /// Remove namespaces left behind by crashed runs (whose process is gone).
    Cleanup,
    /// Measure the emulator's own ceiling and added delay (needs iperf3 and ping).
    Bench(BenchArgs),
}

#[derive(Args, Debug)]
struct LinkArgs {
    /// Bottleneck rate each way: 200mbit, 1gbit, unlimited.
    #[arg(long, value_parser = parse_rate, default_value = "unlimited")]
    rate: u64,
    /// One-way delay each way (RTT is twice this): 25ms.
    #[arg(long, value_parser = parse_duration, default_value = "0ms")]
    delay: Duration,
    /// Uniform jitter on the one-way delay: 2ms.
    #[arg(long, value_parser = parse_duration, default_value = "0ms")]
    jitter: Duration,
    /// Let jitter reorder packets.
    #[arg(long)]
    reorder: bool,
    /// I.i.d. loss each way: 1% or 0.01.
    #[arg(long, value_parser = parse_probability, default_value = "0")]
    loss: f64,
    /// Gilbert-Elliott burst loss: P_GOOD_TO_BAD,P_BAD_TO_GOOD,LOSS_GOOD,LOSS_BAD (e.g. 1%,20%,0,100%).
    #[arg(long, value_parser = parse_ge)]
    ge: Option<GilbertElliott>,
    /// Droptail queue: 100pkt, 256kb, 1mb.
    #[arg(long, value_parser = parse_queue)]
    queue: Option<amst_linkem::QueueLimit>,
    /// MTU of both TUN devices.
    #[arg(long, default_value_t = 1500)]
    mtu: u32,
    /// Overrides for left-to-right only: rate=50mbit,delay=10ms,...
    #[arg(long, value_name = "SETTINGS")]
    l2r: Option<String>,
    /// Overrides for right-to-left only.
    #[arg(long, value_name = "SETTINGS")]
    r2l: Option<String>,
    /// A timed change, repeatable: 10s:rate=100mbit,delay=40ms (both ways), or
    /// 10s:l2r:loss=2% for one direction.
    #[arg(long = "at", value_name = "TIME:SETTINGS")]
    at: Vec<String>,
    /// Seed for loss and jitter (default: random).
    #[arg(long)]
    seed: Option<u64>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum WaitFor {
    /// End when the last command listed exits; the others get SIGTERM.
    Last,
    /// End when every command has exited.
    All,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    link: LinkArgs,
    /// Pause between starting consecutive commands, so servers are listening first.
    #[arg(long, value_parser = parse_duration, default_value = "300ms")]
    stagger: Duration,
    /// When the run ends.
    #[arg(long, value_enum, default_value_t = WaitFor::Last)]
    wait: WaitFor,
    /// `left: CMD ARGS... right: CMD ARGS...`
    #[arg(last = true, allow_hyphen_values = true)]
    commands: Vec<String>,
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// UDP rates to try for the loss ceiling.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "500mbit,1gbit,1.5gbit,2gbit,3gbit"
    )]
    udp_rates: Vec<String>,
}

fn parse_ge(s: &str) -> Result<GilbertElliott, String> {
    let v: Vec<f64> = s
        .split(',')
        .map(parse_probability)
        .collect::<Result<_, _>>()?;
    let [p, r, lg, lb] = v[..] else {
        return Err("need four values: p,r,loss_good,loss_bad".into());
    };
    Ok(GilbertElliott {
        p_good_to_bad: p,
        p_bad_to_good: r,
        loss_in_good: lg,
        loss_in_bad: lb,
    })
}

fn apply_settings(p: &mut LinkParams, settings: &str) -> Result<(), String> {
    for kv in settings.split(',').filter(|s| !s.is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("expected key=value, got {kv:?}"))?;
        p.apply_setting(k.trim(), v.trim())?;
    }
    Ok(())
}

fn parse_step(spec: &str) -> Result<(Duration, Option<Direction>, String), String> {
    let (t, rest) = spec
        .split_once(':')
        .ok_or_else(|| format!("--at {spec:?}: expected TIME:SETTINGS"))?;
    let at = parse_duration(t)?;
    let (dir, settings) = match rest.split_once(':') {
        Some(("l2r", s)) => (Some(Direction::LeftToRight), s),
        Some(("r2l", s)) => (Some(Direction::RightToLeft), s),
        Some((d, _)) => {
            return Err(format!(
                "--at {spec:?}: unknown direction {d:?} (l2r or r2l)"
            ));
        }
        None => (None, rest),
    };
    // Validate now rather than when the step fires.
    apply_settings(&mut LinkParams::default(), settings)?;
    Ok((at, dir, settings.to_string()))
}

fn build_link(a: &LinkArgs) -> Result<LinkEm, String> {
    let mut p = LinkParams {
        rate_bps: a.rate,
        delay: a.delay,
        jitter: a.jitter,
        reorder: a.reorder,
        loss: a.loss,
        gilbert_elliott: a.ge,
        mtu: a.mtu,
        ..LinkParams::default()
    };
    if let Some(q) = a.queue {
        p.queue = q;
    }
    let mut l2r = p.clone();
    let mut r2l = p;
    if let Some(s) = &a.l2r {
        apply_settings(&mut l2r, s)?;
    }
    if let Some(s) = &a.r2l {
        apply_settings(&mut r2l, s)?;
    }
    let mut schedule = Schedule::new();
    let mut max_mtu = a.mtu;
    for spec in &a.at {
        let (at, dir, settings) = parse_step(spec)?;
        let mut probe = LinkParams::default();
        apply_settings(&mut probe, &settings)?;
        if settings.contains("mtu=") {
            max_mtu = max_mtu.max(probe.mtu);
        }
        let change = move |p: &mut LinkParams| {
            let _ = apply_settings(p, &settings);
        };
        schedule = match dir {
            Some(d) => schedule.at_dir(at, d, change),
            None => schedule.at(at, change),
        };
    }
    let mut b = LinkEm::builder()
        .direction(Direction::LeftToRight, l2r)
        .direction(Direction::RightToLeft, r2l)
        .schedule(schedule)
        .max_mtu(max_mtu);
    if let Some(seed) = a.seed {
        b = b.seed(seed);
    }
    b.start().map_err(|e| format!("starting the link: {e}"))
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

fn split_commands(words: &[String]) -> Result<Vec<(bool, Vec<String>)>, String> {
    let mut out: Vec<(bool, Vec<String>)> = Vec::new();
    for w in words {
        match w.as_str() {
            "left:" => out.push((true, Vec::new())),
            "right:" => out.push((false, Vec::new())),
            _ => match out.last_mut() {
                Some((_, cmd)) => cmd.push(w.clone()),
                None => {
                    return Err(format!(
                        "commands must start with left: or right:, got {w:?}"
                    ));
                }
            },
        }
    }
    if let Some((_, c)) = out.iter().find(|(_, c)| c.is_empty()) {
        let _ = c;
        return Err("an empty left: or right: command".into());
    }
    Ok(out)
}

fn terminate(children: &mut [(String, Child)]) {
    for (_, c) in children.iter_mut() {
        if c.try_wait().ok().flatten().is_none() {
            // SAFETY: sending a signal to our own child by pid.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        }
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    for (_, c) in children.iter_mut() {
        while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn run(args: RunArgs) -> Result<ExitCode, String> {
    let commands = split_commands(&args.commands)?;
    install_signal_handlers();
    let link = build_link(&args.link)?;
    let (l, r) = (link.left(), link.right());
    eprintln!(
        "amst-linkem: left {} ({}) <-> right {} ({})",
        l.name(),
        l.addr(),
        r.name(),
        r.addr()
    );
    eprintln!("amst-linkem: l2r {}", link.params(Direction::LeftToRight));
    eprintln!("amst-linkem: r2l {}", link.params(Direction::RightToLeft));
    let mut children: Vec<(String, Child)> = Vec::new();
    let mut code = ExitCode::SUCCESS;
    for (i, (left, argv)) in commands.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(args.stagger);
        }
        if INTERRUPTED.load(Ordering::SeqCst) {
            break;
        }
        let ns: &Namespace = if *left { l } else { r };
        let label = format!(
            "{}: {}",
            if *left { "left" } else { "right" },
            argv.join(" ")
        );
        match ns.command(&argv[0]).args(&argv[1..]).spawn() {
            Ok(c) => children.push((label, c)),
            Err(e) => {
                eprintln!("amst-linkem: cannot start {label}: {e}");
                code = ExitCode::from(127);
                INTERRUPTED.store(true, Ordering::SeqCst);
            }
        }
    }
    if children.is_empty() && !INTERRUPTED.load(Ordering::SeqCst) {
        eprintln!(
            "amst-linkem: link up; `ip netns exec {} <cmd>` to use it; Ctrl-C to stop",
            l.name()
        );
    }
    let mut done = vec![false; children.len()];
    loop {
        if INTERRUPTED.load(Ordering::SeqCst) {
            if code == ExitCode::SUCCESS {
                code = ExitCode::from(130);
            }
            break;
        }
        for (i, (label, c)) in children.iter_mut().enumerate() {
            if !done[i]
                && let Ok(Some(status)) = c.try_wait()
            {
                done[i] = true;
                if !status.success() {
                    eprintln!("amst-linkem: {label} exited with {status}");
                    if code == ExitCode::SUCCESS {
                        code = ExitCode::from(status.code().unwrap_or(1).clamp(1, 255) as u8);
                    }
                }
            }
        }
        let finished = match args.wait {
            WaitFor::Last => done.last().copied().unwrap_or(false),
            WaitFor::All => !done.is_empty() && done.iter().all(|d| *d),
        };
        if finished {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    terminate(&mut children);
    eprintln!("amst-linkem: {:?}", link.counters());
    drop(link);
    Ok(code)
}

fn json_field(v: &str, path: &[&str]) -> Option<f64> {
    let v: serde_json::Value = serde_json::from_str(v).ok()?;
    path.iter().try_fold(&v, |v, k| v.get(k))?.as_f64()
}

fn iperf3(link: &LinkEm, secs: u32, udp_rate: Option<u64>) -> Result<String, String> {
    let mut server = link
        .right()
        .command("iperf3")
        .args(["-s", "-1"])
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("iperf3: {e}"))?;
    std::thread::sleep(Duration::from_millis(300));
    let mut c = link.left().command("iperf3");
    c.args([
        "-c",
        &link.right().addr().to_string(),
        "-J",
        "-t",
        &secs.to_string(),
    ]);
    if let Some(rate) = udp_rate {
        c.args(["-u", "-b", &rate.to_string(), "-l", "1400"]);
    }
    let out = c.output().map_err(|e| format!("iperf3: {e}"))?;
    let _ = server.wait();
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn bench(args: BenchArgs) -> Result<ExitCode, String> {
    amst_linkem::check_privileges()?;
    let link = LinkEm::builder().start().map_err(|e| e.to_string())?;
    // Added delay at 0 configured delay.
    let out = link
        .left()
        .command("ping")
        .args([
            "-n",
            "-q",
            "-c",
            "200",
            "-i",
            "0.01",
            &link.right().addr().to_string(),
        ])
        .output()
        .map_err(|e| format!("ping: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let summary = text
        .lines()
        .find(|l| l.contains("min/avg"))
        .unwrap_or("no ping summary")
        .to_string();
    println!("added RTT at 0 configured delay (ping through both directions): {summary}");
    drop(link);

    let link = LinkEm::builder().start().map_err(|e| e.to_string())?;
    let tcp = iperf3(&link, args.seconds, None)?;
    let bps = json_field(&tcp, &["end", "sum_received", "bits_per_second"]).unwrap_or(0.0);
    let retr = json_field(&tcp, &["end", "sum_sent", "retransmits"]).unwrap_or(0.0);
    let tun = link.counters().left_to_right.dropped_tun;
    println!(
        "TCP at unlimited configured rate: {:.0} Mbit/s goodput, {retr} retransmits, {tun} emulator drops",
        bps / 1e6
    );
    drop(link);

    let link = LinkEm::builder()
        .rate_bps(1_000_000_000)
        .delay(Duration::from_millis(10))
        .queue_bytes(2_000_000)
        .start()
        .map_err(|e| e.to_string())?;
    let tcp = iperf3(&link, args.seconds, None)?;
    let bps = json_field(&tcp, &["end", "sum_received", "bits_per_second"]).unwrap_or(0.0);
    let tun = link.counters().left_to_right.dropped_tun;
    println!(
        "TCP at 1 Gbit/s, 20 ms RTT, 2 MB queue: {:.0} Mbit/s goodput (max ~965 after headers), {tun} emulator drops",
        bps / 1e6
    );
    drop(link);

    // The emulator's own loss is what the sending kernel drops because the forwarder fell
    // behind (`dropped_tun`); iperf3's figure also counts its receiver's socket overflows.
    let mut ceiling = None;
    for r in &args.udp_rates {
        let rate = parse_rate(r)?;
        let link = LinkEm::builder().start().map_err(|e| e.to_string())?;
        let udp = iperf3(&link, args.seconds, Some(rate))?;
        let c = link.counters().left_to_right;
        let iperf_lost = json_field(&udp, &["end", "sum", "lost_percent"]).unwrap_or(100.0);
        let offered = c.packets_in + c.dropped_tun;
        let added = 100.0 * (c.dropped_tun + c.write_errors) as f64 / offered.max(1) as f64;
        let secs = args.seconds as f64;
        println!(
            "UDP offered {:>5.0} Mbit/s: emulator forwarded {:>5.0} Mbit/s ({:.0} kpkt/s), emulator-added loss {added:.3}%, \
             iperf3 end-to-end loss {iperf_lost:.3}%",
            rate as f64 / 1e6,
            c.bytes_out as f64 * 8.0 / secs / 1e6,
            c.packets_out as f64 / secs / 1e3,
        );
        // What counts is the rate the emulator actually carried: on a busy machine iperf3
        // itself may not reach the offered rate.
        let carried = c.bytes_out as f64 * 8.0 / secs;
        if added < 1.0 && ceiling.is_none_or(|(b, _)| carried > b) {
            ceiling = Some((carried, c.packets_out as f64 / secs));
        }
    }
    match ceiling {
        Some((bps, pps)) => println!(
            "ceiling: {:.0} Mbit/s ({:.0} kpkt/s of 1428-byte packets) carried with < 1% emulator-added loss",
            bps / 1e6,
            pps / 1e3
        ),
        None => println!("ceiling: below the lowest rate tried"),
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Run(a) => run(*a),
        Cmd::Cleanup => {
            let removed = amst_linkem::cleanup_stale();
            println!("removed {} stale namespace(s) {removed:?}", removed.len());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench(a) => bench(a),
    };
    result.unwrap_or_else(|e| {
        eprintln!("amst-linkem: {e}");
        ExitCode::from(2)
    })
}
