//! `amiprep-sim`: the instance simulator as a process, for running amiprep
//! end to end on one machine (scripts/demo). For every instance a local
//! EC2-compatible endpoint reports running, it runs a real `amiprep-agent`
//! over that instance's own root directory, with a fake-IMDS identity.
//!
//! `--launch-source` also launches one source instance and prints its id.

use std::path::PathBuf;

use amiprep_tests::sim::{SimConfig, Simulator, template_root};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// EC2 endpoint (e.g. http://127.0.0.1:5000).
    #[arg(long)]
    ec2: String,
    /// PKI directory: ca.pem, agent.pem/.key, aws-identity.pem/.key.
    #[arg(long)]
    pki: PathBuf,
    #[arg(long)]
    controller_port: u16,
    /// Where instance roots are created.
    #[arg(long)]
    work: PathBuf,
    /// Launch one source instance and print its id.
    #[arg(long)]
    launch_source: bool,
    /// Launch this many source instances, printing one id per line.
    #[arg(long, default_value_t = 0)]
    launch: u32,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.work)?;
    let ec2 = amiprep_tests::ec2_client(&args.ec2, "us-east-1");
    let sim = Simulator::start(SimConfig {
        ec2: ec2.clone(),
        pki: args.pki.clone(),
        controller_port: args.controller_port,
        template_root: template_root(&args.work),
        work: args.work.join("instances"),
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let count = args.launch.max(u32::from(args.launch_source));
    for _ in 0..count {
        let id = rt.block_on(amiprep_tests::run_instance(&ec2));
        println!("{id}");
    }
    rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        Ok::<_, std::io::Error>(())
    })?;
    eprintln!("{}", sim.log());
    drop(sim);
    Ok(())
}
