//! Standard output and error that may have no reader. `amst send --json | head -3` closes
//! the pipe before the report ends, after the transfer is complete and stored: a panic there
//! (Rust's `println!` on `EPIPE`) would turn a finished transfer into a crash and a failing
//! exit code. Output nobody reads is dropped instead; any other write error is reported once
//! on stderr. Standard error gets the same treatment: with `eprintln!`, a progress line
//! written after the reader of stderr went away panicked (exit 101), and when it panicked in
//! the progress task while the peer was gone too, `amst send` never exited.

use std::fmt::Display;
use std::io::{ErrorKind, Write};

/// Writes `text` and a newline.
pub fn line(text: impl Display) {
    write(format_args!("{text}\n"));
}

/// Writes `text` as it is.
pub fn text(text: impl Display) {
    write(format_args!("{text}"));
}

fn write(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush())
        && e.kind() != ErrorKind::BrokenPipe
    {
        err_line(format_args!("amst: cannot write to standard output: {e}"));
    }
}

/// Writes `text` and a newline to standard error; nothing happens if nobody reads it.
pub fn err_line(text: impl Display) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(format_args!("{text}\n"));
}
