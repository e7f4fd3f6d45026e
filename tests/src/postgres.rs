//! A private PostgreSQL cluster on loopback for one test, from Debian's
//! packages (`postgresql`; `scripts/test-env.sh` installs it): `initdb` into
//! a temporary directory, `postgres` on a free 127.0.0.1 port, trust
//! authentication (nothing but the test can reach it), removed on drop.
//! Run as root, the server runs as the `postgres` user, as it must.

use std::{
    fs,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use crate::{Proc, free_port, run, wait_for};

pub struct Postgres {
    pub port: u16,
    pub proc: Proc,
    bin: PathBuf,
    _dir: tempfile::TempDir,
}

/// `/usr/lib/postgresql/VERSION/bin`, newest first.
fn bin_dir() -> PathBuf {
    let mut dirs: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    dirs.retain(|d| d.join("postgres").exists());
    dirs.sort();
    dirs.pop().expect(
        "PostgreSQL server binaries not found under /usr/lib/postgresql: install the postgresql package (scripts/test-env.sh does)",
    )
}

/// uid and gid of the `postgres` user, when running as root.
fn server_user() -> Option<(u32, u32)> {
    let me = run(Command::new("id").arg("-u"));
    if String::from_utf8_lossy(&me.stdout).trim() != "0" {
        return None;
    }
    let id = |flag: &str| -> u32 {
        let out = run(Command::new("id").args([flag, "postgres"]));
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("the postgres user (from the postgresql package)")
    };
    Some((id("-u"), id("-g")))
}

impl Postgres {
    pub fn start() -> Postgres {
        let bin = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("amiprep-pg")
            .tempdir()
            .expect("temporary directory");
        let data = dir.path().join("data");
        fs::create_dir(&data).expect("data directory");
        let user = server_user();
        if let Some((uid, gid)) = user {
            fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
            std::os::unix::fs::chown(&data, Some(uid), Some(gid)).expect("chown data directory");
        }
        fs::set_permissions(&data, fs::Permissions::from_mode(0o700)).expect("chmod");
        let as_server = |cmd: &mut Command| {
            if let Some((uid, gid)) = user {
                cmd.uid(uid).gid(gid);
            }
        };
        let mut initdb = Command::new(bin.join("initdb"));
        initdb.args(["-D"]).arg(&data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        as_server(&mut initdb);
        let out = run(&mut initdb);
        assert!(
            out.status.success(),
            "initdb: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let mut cmd = Command::new(bin.join("postgres"));
        cmd.arg("-D")
            .arg(&data)
            .args(["-c", "listen_addresses=127.0.0.1", "-c"])
            .arg(format!("port={port}"))
            .arg("-c")
            .arg(format!("unix_socket_directories={}", data.display()))
            .args(["-c", "fsync=off", "-c", "max_connections=200"]);
        as_server(&mut cmd);
        let proc = Proc::spawn("postgres", cmd, dir.path().join("postgres.log"));
        let pg = Postgres {
            port,
            proc,
            bin,
            _dir: dir,
        };
        let ready = wait_for(Duration::from_secs(60), || {
            let out = run(Command::new(pg.bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p"])
                .arg(port.to_string()));
            out.status.success().then_some(())
        });
        assert!(
            ready.is_some(),
            "postgres did not accept connections:\n{}",
            pg.proc.log_text()
        );
        pg
    }

    /// The URL controllers get in `[store] url`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Runs SQL with psql; returns its unaligned, tuples-only output.
    pub fn query(&self, sql: &str) -> String {
        let psql = [self.bin.join("psql"), PathBuf::from("/usr/bin/psql")]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("psql");
        let out = run(Command::new(psql)
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(self.url())
            .args(["-c", sql]));
        assert!(
            out.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}
