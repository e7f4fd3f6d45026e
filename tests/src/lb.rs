//! A TCP load balancer on loopback: each new connection goes to the next
//! backend in turn, skipping backends that refuse it — what agents meet
//! behind one controller address (DNS or an NLB) in front of several
//! controllers.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::net::{TcpListener, TcpStream};

pub struct Balancer {
    pub port: u16,
    _rt: tokio::runtime::Runtime,
}

impl Balancer {
    pub fn start(backends: Vec<SocketAddr>) -> Balancer {
        Self::start_on(0, backends)
    }

    /// As [`Balancer::start`], on 127.0.0.1:`port` (0: any free port).
    pub fn start_on(port: u16, backends: Vec<SocketAddr>) -> Balancer {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("balancer runtime");
        let listener = rt
            .block_on(TcpListener::bind(("127.0.0.1", port)))
            .expect("balancer listener");
        let port = listener.local_addr().expect("address").port();
        let next = Arc::new(AtomicUsize::new(0));
        let backends = Arc::new(backends);
        rt.spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                let (next, backends) = (next.clone(), backends.clone());
                tokio::spawn(async move {
                    let first = next.fetch_add(1, Ordering::Relaxed);
                    for i in 0..backends.len() {
                        let to = backends[(first + i) % backends.len()];
                        if let Ok(mut outbound) = TcpStream::connect(to).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                            return;
                        }
                    }
                });
            }
        });
        Balancer { port, _rt: rt }
    }
}
