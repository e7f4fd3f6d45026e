//! Bad configuration and bad certificates are refused at start-up with exit
//! code 2 and a message naming the file and the key.

use std::{fs, process::Command, time::Duration};

use amiprep_tests::{Pki, bin, run};

fn serve(config: &std::path::Path) -> (i32, String) {
    let mut child = Command::new(bin("amiprep"))
        .args(["serve", "--config"])
        .arg(config)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let status =
        amiprep_tests::wait_for(Duration::from_secs(10), || child.try_wait().ok().flatten());
    let Some(status) = status else {
        let _ = child.kill();
        panic!("controller kept running with a bad configuration");
    };
    let mut err = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.code().unwrap_or(-1), err)
}

fn base(pki: &Pki) -> String {
    format!(
        "[listen]\nagents = \"127.0.0.1:0\"\nadmin_socket = {:?}\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        pki.file("admin.sock"),
        pki.file("ca.pem"),
        pki.file("controller.pem"),
        pki.file("controller.key"),
    )
}

#[test]
fn unknown_key_exits_2_naming_file_and_key() {
    let pki = Pki::new();
    let path = pki.file("bad.toml");
    fs::write(
        &path,
        format!("{}[sessions]\nheartbeat_intervall_secs = 5\n", base(&pki)),
    )
    .unwrap();
    let (code, err) = serve(&path);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("sessions.heartbeat_intervall_secs"), "{err}");
}

#[test]
fn bad_value_exits_2_naming_key() {
    let pki = Pki::new();
    let path = pki.file("bad.toml");
    fs::write(
        &path,
        format!(
            "{}[sessions]\nheartbeat_interval_secs = \"often\"\n",
            base(&pki)
        ),
    )
    .unwrap();
    let (code, err) = serve(&path);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("sessions.heartbeat_interval_secs"), "{err}");

    let path = pki.file("bad2.toml");
    fs::write(&path, base(&pki).replace("127.0.0.1:0", "not-an-address")).unwrap();
    let (code, err) = serve(&path);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("listen.agents"), "{err}");
}

#[test]
fn missing_config_and_syntax_error_exit_2() {
    let pki = Pki::new();
    let (code, err) = serve(&pki.file("nope.toml"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("nope.toml"), "{err}");
    let path = pki.file("syntax.toml");
    fs::write(&path, "[tls\n").unwrap();
    let (code, err) = serve(&path);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("syntax.toml") && err.contains("line 1"),
        "{err}"
    );
}

#[test]
fn agent_bad_config_exits_2() {
    let pki = Pki::new();
    let path = pki.file("agent-bad.toml");
    fs::write(&path, "controller = \"127.0.0.1:1\"\ncolour = \"blue\"\n").unwrap();
    let out = run(Command::new(bin("amiprep-agent"))
        .args(["run", "--config"])
        .arg(&path));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("agent-bad.toml") && err.contains("colour"),
        "{err}"
    );
}

/// Issues a certificate from the test CA with the given validity window.
fn issue_with_validity(pki: &Pki, name: &str, server: bool, from_days: i64, to_days: i64) {
    let ca_key =
        rcgen::KeyPair::from_pem(&fs::read_to_string(pki.file("ca.key")).unwrap()).unwrap();
    let issuer =
        rcgen::Issuer::from_ca_cert_pem(&fs::read_to_string(pki.file("ca.pem")).unwrap(), ca_key)
            .unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.extended_key_usages = vec![if server {
        rcgen::ExtendedKeyUsagePurpose::ServerAuth
    } else {
        rcgen::ExtendedKeyUsagePurpose::ClientAuth
    }];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now + time::Duration::days(from_days);
    params.not_after = now + time::Duration::days(to_days);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    fs::write(pki.file(&format!("{name}.pem")), cert.pem()).unwrap();
    fs::write(pki.file(&format!("{name}.key")), key.serialize_pem()).unwrap();
}

#[test]
fn expired_or_not_yet_valid_certificates_are_refused_with_a_message() {
    let pki = Pki::new();
    issue_with_validity(&pki, "old", true, -30, -1);
    issue_with_validity(&pki, "future", true, 10, 30);
    for (name, words) in [("old", "expired"), ("future", "not valid until")] {
        let path = pki.file(&format!("{name}.toml"));
        fs::write(
            &path,
            base(&pki)
                .replace("controller.pem", &format!("{name}.pem"))
                .replace("controller.key", &format!("{name}.key")),
        )
        .unwrap();
        let (code, err) = serve(&path);
        assert_eq!(code, 2, "{err}");
        assert!(
            err.contains(words) && err.contains(&format!("{name}.pem")),
            "{err}"
        );
    }

    // The agent refuses its own expired certificate the same way.
    issue_with_validity(&pki, "old-agent", false, -30, -1);
    let path = pki.file("agent-old.toml");
    fs::write(
        &path,
        format!(
            "controller = \"127.0.0.1:1\"\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            pki.file("ca.pem"),
            pki.file("old-agent.pem"),
            pki.file("old-agent.key")
        ),
    )
    .unwrap();
    let out = run(Command::new(bin("amiprep-agent"))
        .args(["run", "--config"])
        .arg(&path));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("expired"), "{err}");

    // And `certs issue` refuses to issue from an expired CA.
    let dir = tempfile::tempdir().unwrap();
    let out = run(Command::new(bin("amiprep"))
        .args(["certs", "init", "--days", "0", "--dir"])
        .arg(dir.path()));
    assert!(out.status.success());
    std::thread::sleep(Duration::from_millis(1100));
    let out = run(Command::new(bin("amiprep"))
        .args(["certs", "issue", "--kind", "agent", "--name", "x", "--dir"])
        .arg(dir.path()));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("expired"), "{err}");
}
