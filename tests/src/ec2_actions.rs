//! Which EC2 API actions does the controller's code call? Derived from the
//! source, so the IAM policy shipped in `packaging/iam/` can be checked
//! against it in both directions.
//!
//! aws-sdk-ec2 exposes each API action as a fluent builder method without
//! arguments (`client.describe_instances()`, `client.create_image()`), and
//! each waiter as `client.wait_until_…()`. The SDK's own sources say which
//! action a method is: `src/operation/<method>.rs` names it
//! (`"EC2", "DescribeInstances"`), and `src/waiters/<name>.rs` names the
//! operation the waiter polls. So a `.name()` call in the controller is an EC2
//! action exactly when the SDK has an operation (or waiter) of that name.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

/// The aws-sdk-ec2 sources the workspace builds against.
#[derive(Debug, Clone)]
pub struct Ec2Sdk {
    src: PathBuf,
}

impl Ec2Sdk {
    /// Finds the aws-sdk-ec2 sources through `cargo metadata` for the
    /// workspace at `workspace` (the version pinned by Cargo.lock).
    pub fn locate(workspace: &Path) -> Result<Ec2Sdk, String> {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = Command::new(cargo)
            .args([
                "metadata",
                "--format-version",
                "1",
                "--locked",
                "--manifest-path",
            ])
            .arg(workspace.join("Cargo.toml"))
            .output()
            .map_err(|e| format!("running cargo metadata: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "cargo metadata failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let meta: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("cargo metadata output: {e}"))?;
        let manifest = meta["packages"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == "aws-sdk-ec2")
            .and_then(|p| p["manifest_path"].as_str())
            .ok_or("aws-sdk-ec2 is not a dependency of the workspace")?;
        let src = Path::new(manifest)
            .parent()
            .map(|d| d.join("src"))
            .ok_or("aws-sdk-ec2 manifest path has no parent")?;
        if !src.join("operation").is_dir() {
            return Err(format!("{} has no operation/ directory", src.display()));
        }
        Ok(Ec2Sdk { src })
    }

    /// The API action a fluent method invokes, e.g. `describe_instances` →
    /// `DescribeInstances`, `wait_until_image_available` → `DescribeImages`;
    /// `None` when the SDK client has no such operation or waiter.
    pub fn action_of(&self, method: &str) -> Option<String> {
        if let Some(waiter) = method.strip_prefix("wait_until_") {
            let text =
                fs::read_to_string(self.src.join("waiters").join(format!("{waiter}.rs"))).ok()?;
            let op = text.split("crate::operation::").nth(1)?;
            let op: String = op
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            return self.action_of(&op);
        }
        if !is_identifier(method) {
            return None;
        }
        let text =
            fs::read_to_string(self.src.join("operation").join(format!("{method}.rs"))).ok()?;
        let rest = text.split("\"EC2\", \"").nth(1)?;
        let name: String = rest.chars().take_while(|c| *c != '"').collect();
        (!name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric())).then_some(name)
    }
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Names of argument-less method calls (`.name()`, whitespace allowed
/// between the dot, the name and the parentheses) in Rust source text, with
/// line comments removed first so documentation does not count.
pub fn nullary_method_calls(source: &str) -> BTreeSet<String> {
    let code: String = source
        .lines()
        .map(|line| match line.find("//") {
            Some(i) if !in_string(&line[..i]) => &line[..i],
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let bytes = code.as_bytes();
    let mut calls = BTreeSet::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'.' {
            i += 1;
            continue;
        }
        let mut j = i + 1;
        while j < bytes.len() && bytes[j].is_ascii_whitespace() {
            j += 1;
        }
        let start = j;
        while j < bytes.len() && (bytes[j].is_ascii_alphanumeric() || bytes[j] == b'_') {
            j += 1;
        }
        let name = &code[start..j];
        while j < bytes.len() && bytes[j].is_ascii_whitespace() {
            j += 1;
        }
        if !name.is_empty() && bytes.get(j) == Some(&b'(') {
            let mut k = j + 1;
            while k < bytes.len() && bytes[k].is_ascii_whitespace() {
                k += 1;
            }
            if bytes.get(k) == Some(&b')') {
                calls.insert(name.to_owned());
            }
        }
        i = start.max(i + 1);
    }
    calls
}

/// Whether the text before a `//` leaves a string literal open (so the `//`
/// is inside it, as in a URL).
fn in_string(prefix: &str) -> bool {
    let mut open = false;
    let mut escaped = false;
    for c in prefix.chars() {
        match c {
            '\\' if open && !escaped => {
                escaped = true;
                continue;
            }
            '"' if !escaped => open = !open,
            _ => {}
        }
        escaped = false;
    }
    open
}

/// EC2 actions called from the `.rs` files beneath `dir`, each with the files
/// that call it (relative to `dir`).
pub fn ec2_actions_in(sdk: &Ec2Sdk, dir: &Path) -> Result<BTreeMap<String, Vec<String>>, String> {
    let mut files = Vec::new();
    collect_rs(dir, &mut files)?;
    files.sort();
    let mut actions: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for file in files {
        let text =
            fs::read_to_string(&file).map_err(|e| format!("reading {}: {e}", file.display()))?;
        let rel = file
            .strip_prefix(dir)
            .unwrap_or(&file)
            .display()
            .to_string();
        for method in nullary_method_calls(&text) {
            if let Some(action) = sdk.action_of(&method) {
                actions.entry(action).or_default().push(rel.clone());
            }
        }
    }
    Ok(actions)
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), String> {
    let entries = fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("reading {}: {e}", dir.display()))?;
        let path = entry.path();
        let kind = entry
            .file_type()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if kind.is_dir() {
            collect_rs(&path, out)?;
        } else if kind.is_file() && path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// The `ec2:` actions an IAM policy document allows (statements with
/// `"Effect": "Allow"`; `Action` as a string or a list). Actions of other
/// services, wildcards and `NotAction` are errors: the policy is meant to be
/// an exact list.
pub fn allowed_ec2_actions(policy: &serde_json::Value) -> Result<BTreeSet<String>, String> {
    let statements = match &policy["Statement"] {
        serde_json::Value::Array(list) => list.clone(),
        s @ serde_json::Value::Object(_) => vec![s.clone()],
        _ => return Err("the policy has no Statement".into()),
    };
    let mut actions = BTreeSet::new();
    for s in &statements {
        if s.get("NotAction").is_some() {
            return Err("NotAction grants everything else: list actions instead".into());
        }
        if s["Effect"] != "Allow" {
            continue;
        }
        let listed: Vec<&str> = match &s["Action"] {
            serde_json::Value::String(a) => vec![a.as_str()],
            serde_json::Value::Array(list) => list
                .iter()
                .map(|a| a.as_str().ok_or("an Action that is not a string"))
                .collect::<Result<_, _>>()?,
            _ => return Err(format!("a statement without Action: {s}")),
        };
        for a in listed {
            let name = a
                .strip_prefix("ec2:")
                .ok_or_else(|| format!("{a}: only ec2: actions are expected"))?;
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric()) {
                return Err(format!("{a}: wildcards and odd names are not allowed"));
            }
            actions.insert(name.to_owned());
        }
    }
    Ok(actions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nullary_calls_across_lines_and_ignores_comments_and_arguments() {
        let src = r#"
            let out = client
                .describe_instances()
                .instance_ids(id)
                .send().await;
            // client.stop_instances() is next
            /// Calls `.terminate_instances()` on failure.
            let c = self.create_image ( );
            let url = "http://example.com/.run_instances()"; let t = x.tags();
            self.describe_instance(region, id);
        "#;
        let calls = nullary_method_calls(src);
        for name in ["describe_instances", "send", "create_image", "tags"] {
            assert!(calls.contains(name), "{name} missing from {calls:?}");
        }
        for name in [
            "stop_instances",
            "terminate_instances",
            "describe_instance",
            "instance_ids",
        ] {
            assert!(!calls.contains(name), "{name} wrongly found in {calls:?}");
        }
        // A call inside a string literal after a URL is not code either, but
        // cheap scanning keeps it; it only ever makes the check stricter.
        assert!(calls.contains("run_instances"));
    }

    #[test]
    fn policy_actions_are_read_from_every_allow_statement() {
        let policy = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Action": ["ec2:DescribeInstances", "ec2:CreateImage"], "Resource": "*"},
                {"Effect": "Allow", "Action": "ec2:CreateTags", "Resource": "*"},
                {"Effect": "Deny", "Action": "ec2:DeleteSnapshot", "Resource": "*"}
            ]
        });
        let got = allowed_ec2_actions(&policy).unwrap();
        let want: BTreeSet<String> = ["CreateImage", "CreateTags", "DescribeInstances"]
            .map(String::from)
            .into();
        assert_eq!(got, want);
        for bad in [
            serde_json::json!({"Statement": {"Effect": "Allow", "Action": "ec2:*"}}),
            serde_json::json!({"Statement": {"Effect": "Allow", "Action": "s3:GetObject"}}),
            serde_json::json!({"Statement": {"Effect": "Allow", "NotAction": "ec2:RunInstances"}}),
        ] {
            assert!(allowed_ec2_actions(&bad).is_err(), "{bad} accepted");
        }
    }
}
