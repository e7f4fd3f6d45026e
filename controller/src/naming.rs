//! AMI name templates: `{date}`, `{time}`, `{instance}`, `{promotion}`.

use time::OffsetDateTime;

/// Renders `template` and checks the result against EC2's AMI name rules
/// (3–128 characters of letters, digits and `( ) [ ] . / - ' @ _` and space).
pub fn render(
    template: &str,
    now: OffsetDateTime,
    instance: &str,
    promotion: &str,
) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unclosed '{{' in name template {template:?}"))?;
        let value = match &after[..end] {
            "date" => format!(
                "{:04}-{:02}-{:02}",
                now.year(),
                u8::from(now.month()),
                now.day()
            ),
            "time" => format!("{:02}{:02}{:02}", now.hour(), now.minute(), now.second()),
            "instance" => instance.to_owned(),
            "promotion" => promotion.to_owned(),
            other => {
                return Err(format!(
                    "unknown placeholder {{{other}}} in name template (use {{date}}, {{time}}, {{instance}}, {{promotion}})"
                ));
            }
        };
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    check(&out)?;
    Ok(out)
}

/// EC2's AMI name rules.
pub fn check(name: &str) -> Result<(), String> {
    let len = name.chars().count();
    if !(3..=128).contains(&len) {
        return Err(format!(
            "AMI name {name:?} has {len} characters; EC2 requires 3 to 128"
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "()[] ./-'@_".contains(*c)))
    {
        return Err(format!(
            "AMI name {name:?} contains {bad:?}; EC2 allows letters, digits, spaces and ( ) [ ] . / - ' @ _"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-11-28 09:05:07 UTC);

    #[test]
    fn placeholders_render() {
        assert_eq!(
            render("web-{date}-{time}-{instance}-{promotion}", NOW, "i-1", "p1").unwrap(),
            "web-2026-11-28-090507-i-1-p1"
        );
        assert_eq!(render("plain name", NOW, "i", "p").unwrap(), "plain name");
    }

    #[test]
    fn bad_templates_and_names_are_refused() {
        assert!(
            render("web-{nope}", NOW, "i", "p")
                .unwrap_err()
                .contains("{nope}")
        );
        assert!(
            render("web-{date", NOW, "i", "p")
                .unwrap_err()
                .contains("unclosed")
        );
        assert!(
            render("ab", NOW, "i", "p")
                .unwrap_err()
                .contains("3 to 128")
        );
        assert!(render(&"a".repeat(129), NOW, "i", "p").is_err());
        assert!(render("web:1", NOW, "i", "p").unwrap_err().contains("':'"));
        assert!(check("Ubuntu (22.04) [x] base/v1 - it's @me_").is_ok());
    }
}
