use std::time::Duration;
fn main() -> std::io::Result<()> {
    amst_linkem::check_privileges().unwrap();
    let link = amst_linkem::LinkEm::builder().delay(Duration::from_millis(10)).start()?;
    println!("left {} right {}", link.left().name(), link.right().name());
    for ns in [link.left(), link.right()] {
        let out = ns.command("ip").args(["-br", "addr"]).output()?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
        let out = ns.command("ip").args(["route"]).output()?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    let out = link.left().command("ping").args(["-c", "5", "-i", "0.2", "198.18.0.2"]).output()?;
    print!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{:?}", link.counters());
    let out = std::process::Command::new("ip").args(["netns", "list"]).output()?;
    print!("netns: {}", String::from_utf8_lossy(&out.stdout));
    drop(link);
    let out = std::process::Command::new("ip").args(["netns", "list"]).output()?;
    print!("after drop netns: {}", String::from_utf8_lossy(&out.stdout));
    Ok(())
}
