use std::time::Duration;
fn main() -> std::io::Result<()> {
    amst_linkem::check_privileges().unwrap();
    let link = amst_linkem::LinkEm::builder().start()?;
    let out = link
        .left()
        .command("ping")
        .args(["-c", "20", "-i", "0.05", "-q", "198.18.0.2"])
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
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
        .args(["-c", "198.18.0.2", "-t", "5"])
        .output()?;
    print!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    srv.wait()?;
    println!("{:?}", link.counters());
    Ok(())
}
