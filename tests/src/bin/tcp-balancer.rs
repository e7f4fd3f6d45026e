//! `tcp-balancer PORT BACKEND...`: a round-robin TCP balancer on
//! 127.0.0.1:PORT (see `amiprep_tests::lb`), for benchmarks that put several
//! controllers behind one agent address. Runs until killed.

fn main() {
    let mut args = std::env::args().skip(1);
    let port: Option<u16> = args.next().and_then(|p| p.parse().ok());
    let backends: Result<Vec<std::net::SocketAddr>, _> = args.map(|a| a.parse()).collect();
    let (Some(port), Ok(backends)) = (port, backends) else {
        eprintln!("usage: tcp-balancer PORT HOST:PORT...");
        std::process::exit(2);
    };
    if backends.is_empty() {
        eprintln!("usage: tcp-balancer PORT HOST:PORT...");
        std::process::exit(2);
    }
    let _lb = amiprep_tests::lb::Balancer::start_on(port, backends);
    loop {
        std::thread::park();
    }
}
