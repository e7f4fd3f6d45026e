//! Command-line behaviour: policy show, exit codes, usage errors.

use std::process::Command;

use crate::util::{Fixture, stderr, stdout};

fn agent(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_amiprep-agent"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn policy_show_prints_the_defaults_as_toml() {
    let o = agent(&["policy", "show"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let text = stdout(&o);
    let back = amiprep_agent::policy::Policy::from_toml(&text, "show").unwrap();
    assert_eq!(back, amiprep_agent::policy::Policy::default());
    assert!(text.contains("remove_authorized_keys = true"), "{text}");
}

#[test]
fn policy_show_applies_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p.toml");
    std::fs::write(&p, "[identity]\nhostname = \"golden\"\n").unwrap();
    let o = agent(&["policy", "show", "--policy", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("hostname = \"golden\""));
}

#[test]
fn unknown_policy_key_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p.toml");
    std::fs::write(&p, "[logs]\ntruncate_actve = false\n").unwrap();
    for args in [
        vec!["policy", "show", "--policy", p.to_str().unwrap()],
        vec![
            "prepare",
            "--root",
            "/nonexistent",
            "--policy",
            p.to_str().unwrap(),
        ],
    ] {
        let o = agent(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(stderr(&o).contains("logs.truncate_actve"), "{}", stderr(&o));
    }
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(
        agent(&["prepare", "--only", "bogus"]).status.code(),
        Some(2)
    );
    assert_eq!(
        agent(&["prepare", "--format", "yaml"]).status.code(),
        Some(2)
    );
    assert_eq!(
        agent(&["prepare", "--root", "/nonexistent/amiprep"])
            .status
            .code(),
        Some(2)
    );
}

#[test]
fn text_report_on_a_debian_root() {
    let f = Fixture::new();
    f.write("tmp/junk", b"12345");
    let o = f.agent(&["--dry-run", "--only", "temp"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let t = stdout(&o);
    assert!(t.contains("[temp] Planned"), "{t}");
    assert!(t.contains("remove   /tmp/junk (5 bytes)"), "{t}");
    assert!(t.contains("[packages] Skipped"), "{t}");
    assert!(t.contains("READY"), "{t}");
    assert!(f.path("tmp/junk").exists());
}
