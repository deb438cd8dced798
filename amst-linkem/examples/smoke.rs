use std::time::Duration;
fn stats(ns: &amst_linkem::Namespace) -> (String, String) {
    ns.run(|| {
        let dev = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap();
        let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap();
        (
            dev.lines()
                .filter(|l| l.contains("linkem0"))
                .collect::<String>(),
            snmp.lines()
                .filter(|l| l.starts_with("Udp:"))
                .collect::<Vec<_>>()
                .join("\n"),
        )
    })
}
fn main() -> std::io::Result<()> {
    let rate = std::env::args().nth(1).unwrap_or("1G".into());
    let link = amst_linkem::LinkEm::builder().start()?;
    let mut srv = link
        .right()
        .command("iperf3")
        .args(["-s", "-1"])
        .stdout(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    let out = link
        .left()
        .command("iperf3")
        .args([
            "-c",
            "198.18.0.2",
            "-t",
            "3",
            "-u",
            "-b",
            &rate,
            "-l",
            "1400",
        ])
        .output()?;
    print!(
        "{}",
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("sender") || l.contains("receiver"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    srv.wait()?;
    println!("\n{:?}", link.counters().left_to_right);
    println!(
        "left {:?}\nright {:?}",
        stats(link.left()),
        stats(link.right())
    );
    Ok(())
}
