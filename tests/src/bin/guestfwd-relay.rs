//! `guestfwd-relay HOST:PORT`: joins its stdin/stdout to a new TCP
//! connection. qemu's `guestfwd=...-cmd:` runs one per guest connection, so
//! every connection from the guest becomes its own connection on host
//! loopback (a `tcp:` chardev would carry all of them over one stream).

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpStream},
};

fn main() -> std::io::Result<()> {
    let Some(addr) = std::env::args().nth(1) else {
        eprintln!("usage: guestfwd-relay HOST:PORT");
        std::process::exit(2);
    };
    let stream = TcpStream::connect(&addr)?;
    let mut to_host = stream.try_clone()?;
    let upstream = std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut to_host);
        let _ = to_host.shutdown(Shutdown::Write);
    });
    let mut from_host = stream;
    let mut out = std::io::stdout().lock();
    let mut buf = [0u8; 16384];
    loop {
        let n = from_host.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
        out.flush()?;
    }
    let _ = upstream.join();
    Ok(())
}
