//! A host-like tree of planted credentials and look-alikes, generated at
//! test time (random values: no credential-shaped text is committed beyond
//! the rule examples). Every planted credential is listed with the lines it
//! spans and the rule expected to report it; every look-alike file is listed
//! so a test can check none of it is reported.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use base64::Engine as _;
use rand::{Rng, distr::Alphanumeric};

#[derive(Debug, Clone, serde::Serialize)]
pub struct Planted {
    pub path: String,
    /// 1-based lines the credential spans (first, last).
    pub lines: (u64, u64),
    pub rule: String,
    /// The planted value, so tests can check no output contains it.
    #[serde(skip)]
    pub value: String,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct Fixture {
    pub planted: Vec<Planted>,
    /// Files holding only look-alikes: nothing in them may be reported.
    pub lookalikes: Vec<String>,
}

fn alnum(n: usize) -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(n)
        .map(char::from)
        .collect()
}

fn from_set(set: &[u8], n: usize) -> String {
    let mut r = rand::rng();
    (0..n)
        .map(|_| set[r.random_range(0..set.len())] as char)
        .collect()
}

fn hex(n: usize) -> String {
    from_set(b"0123456789abcdef", n)
}

fn b64(n: usize) -> String {
    from_set(
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
        n,
    )
}

fn upper32(n: usize) -> String {
    from_set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", n)
}

/// A password people would plausibly set: letters, digits, a symbol.
fn password() -> String {
    format!("{}-{}{}", alnum(8), alnum(6), from_set(b"!#%+", 1))
}

fn wrap(s: &str, width: usize) -> String {
    s.as_bytes()
        .chunks(width)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

fn pem(label: &str, body_bytes: usize) -> (String, String) {
    let raw: Vec<u8> = (0..body_bytes).map(|_| rand::rng().random()).collect();
    let body = wrap(&base64::engine::general_purpose::STANDARD.encode(raw), 64);
    (
        format!("-----BEGIN {label}-----\n{body}\n-----END {label}-----\n"),
        body,
    )
}

fn openssh_key(cipher: &str) -> (String, String) {
    let mut raw = b"openssh-key-v1\0".to_vec();
    let kdf = if cipher == "none" { "none" } else { "bcrypt" };
    for s in [cipher, kdf] {
        raw.extend((s.len() as u32).to_be_bytes());
        raw.extend(s.as_bytes());
    }
    raw.extend(0u32.to_be_bytes());
    raw.extend(1u32.to_be_bytes());
    raw.extend((0..300).map(|_| rand::rng().random::<u8>()));
    let body = wrap(&base64::engine::general_purpose::STANDARD.encode(raw), 70);
    (
        format!("-----BEGIN OPENSSH PRIVATE KEY-----\n{body}\n-----END OPENSSH PRIVATE KEY-----\n"),
        body,
    )
}

struct Builder<'a> {
    root: &'a Path,
    fx: Fixture,
}

impl Builder<'_> {
    fn write(&self, rel: &str, content: &str) {
        let p = self.root.join(rel);
        fs::create_dir_all(p.parent().expect("has parent")).expect("mkdir");
        let mut f = fs::File::create(&p).expect("create");
        f.write_all(content.as_bytes()).expect("write");
    }

    /// Write `content` at `rel`; each `(rule, value)` is a planted credential
    /// whose value occurs in the content.
    fn plant(&mut self, rel: &str, content: &str, creds: &[(&str, &str)]) {
        self.write(rel, content);
        for (rule, value) in creds {
            let at = content
                .find(value)
                .unwrap_or_else(|| panic!("{rel}: planted value not in content"));
            let first = 1 + content[..at].matches('\n').count() as u64;
            let last = first + value.matches('\n').count() as u64;
            // Tools report a key at its BEGIN line or at its body.
            let first = first.saturating_sub(u64::from(value.contains('\n'))).max(1);
            self.fx.planted.push(Planted {
                path: rel.to_owned(),
                lines: (first, last),
                rule: (*rule).to_owned(),
                value: (*value).to_owned(),
            });
        }
    }

    fn lookalike(&mut self, rel: &str, content: &str) {
        self.write(rel, content);
        self.fx.lookalikes.push(rel.to_owned());
    }
}

/// Generate the fixture beneath `root` (an empty directory).
pub fn generate(root: &Path) -> Fixture {
    let mut b = Builder {
        root,
        fx: Fixture::default(),
    };

    // --- Cloud credentials
    let akid = format!("AKIA{}", upper32(16));
    let sak = b64(40);
    let token = format!("IQoJb3JpZ2luX2Vj{}", b64(300));
    b.plant(
        "root/.aws/credentials",
        &format!(
            "[default]\naws_access_key_id = {akid}\naws_secret_access_key = {sak}\n\n[ci]\naws_session_token = {token}\nregion = eu-west-1\n"
        ),
        &[
            ("aws-access-key-id", &akid),
            ("aws-secret-access-key", &sak),
            ("aws-session-token", &token),
        ],
    );
    let azure = format!("{}==", b64(86));
    b.plant(
        "home/app/.config/app/azure.env",
        &format!("AZURE_STORAGE_CONNECTION_STRING=\"DefaultEndpointsProtocol=https;AccountName=prodlogs;AccountKey={azure};EndpointSuffix=core.windows.net\"\n"),
        &[("azure-storage-key", &azure)],
    );
    let sas = format!("{}=", b64(43));
    b.plant(
        "etc/orders/servicebus.conf",
        &format!("[bus]\nconnection = Endpoint=sb://orders.servicebus.windows.net/;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey={sas}\n"),
        &[("azure-connection-string", &sas)],
    );
    let gkey = format!("AIza{}", alnum(35));
    b.plant(
        "var/www/app/static/maps.js",
        &format!("const map = new Maps({{\n  key: \"{gkey}\",\n  zoom: 4,\n}});\n"),
        &[("google-api-key", &gkey)],
    );
    let (sa_pem, _) = pem("PRIVATE KEY", 1200);
    let sa_escaped = sa_pem.replace('\n', "\\n");
    b.plant(
        "opt/app/gcp-service-account.json",
        &format!("{{\n  \"type\": \"service_account\",\n  \"project_id\": \"prod-42\",\n  \"private_key_id\": \"{}\",\n  \"private_key\": \"{sa_escaped}\",\n  \"client_email\": \"ci@prod-42.iam.gserviceaccount.com\"\n}}\n", hex(40)),
        &[("gcp-service-account", &sa_escaped[..60])],
    );

    // --- Private keys
    let (rsa, rsa_body) = pem("RSA PRIVATE KEY", 1190);
    b.plant("root/.ssh/id_rsa", &rsa, &[("private-key-rsa", &rsa_body)]);
    let (ossh, ossh_body) = openssh_key("none");
    b.plant(
        "home/deploy/.ssh/id_ed25519",
        &ossh,
        &[("private-key-openssh", &ossh_body)],
    );
    let (ossh_enc, ossh_enc_body) = openssh_key("aes256-ctr");
    b.plant(
        "home/deploy/.ssh/id_ecdsa",
        &ossh_enc,
        &[("private-key-encrypted", &ossh_enc_body)],
    );
    let (p8, p8_body) = pem("PRIVATE KEY", 1210);
    b.plant(
        "etc/ssl/private/server.key",
        &p8,
        &[("private-key-pkcs8", &p8_body)],
    );
    let (ec, ec_body) = pem("EC PRIVATE KEY", 121);
    b.plant("etc/nginx/ec.key", &ec, &[("private-key-ec", &ec_body)]);
    let (dsa, dsa_body) = pem("DSA PRIVATE KEY", 440);
    b.plant(
        "etc/ssh/legacy_dsa_key",
        &dsa,
        &[("private-key-dsa", &dsa_body)],
    );
    let (enc, enc_body) = pem("ENCRYPTED PRIVATE KEY", 1250);
    b.plant(
        "opt/app/tls/client.enc.pem",
        &enc,
        &[("private-key-encrypted", &enc_body)],
    );
    let ppk_priv = b64(44);
    b.plant(
        "home/deploy/keys/deploy.ppk",
        &format!(
            "PuTTY-User-Key-File-3: ssh-ed25519\nEncryption: none\nComment: deploy@build\nPublic-Lines: 2\n{}\n{}\nPrivate-Lines: 1\n{ppk_priv}\nPrivate-MAC: {}\n",
            b64(64),
            b64(4),
            hex(64)
        ),
        &[("private-key-putty", &ppk_priv)],
    );

    // --- Service tokens
    let ghp = format!("ghp_{}", alnum(36));
    b.plant(
        "etc/default/ci-runner",
        &format!("RUNNER_NAME=build-1\nGITHUB_TOKEN={ghp}\n"),
        &[("github-token", &ghp)],
    );
    let fine = format!("github_pat_{}_{}", alnum(22), alnum(59));
    b.plant(
        "opt/app/.env",
        &format!("NODE_ENV=production\nGH_PAT={fine}\n"),
        &[("github-fine-grained-token", &fine)],
    );
    let glpat = format!("glpat-{}", alnum(20));
    b.plant(
        "srv/repo/.git/config",
        &format!("[core]\n\tbare = false\n[remote \"origin\"]\n\turl = https://ci:{glpat}@gitlab.example.com/shop/web.git\n\tfetch = +refs/heads/*:refs/remotes/origin/*\n"),
        &[("gitlab-token", &glpat)],
    );
    let digits = |n| from_set(b"0123456789", n);
    let xoxb = format!("xoxb-{}-{}-{}", digits(11), digits(13), alnum(24));
    b.plant(
        "etc/notify/slack.conf",
        &format!("[slack]\nchannel = #ops\nbot_token = {xoxb}\n"),
        &[("slack-token", &xoxb)],
    );
    let hook = format!("T{}/B{}/{}", upper32(8), upper32(10), alnum(24));
    b.plant(
        "etc/alertmanager/alertmanager.yml",
        &format!("global:\n  slack_api_url: https://hooks.slack.com/services/{hook}\nroute:\n  receiver: ops\n"),
        &[("slack-webhook", &hook)],
    );
    let stripe = format!("sk_live_{}", alnum(40));
    b.plant(
        "srv/shop/.env",
        &format!("APP_ENV=prod\nSTRIPE_SECRET_KEY={stripe}\n"),
        &[("stripe-key", &stripe)],
    );
    let twilio = hex(32);
    b.plant(
        "etc/sms/twilio.env",
        &format!(
            "TWILIO_ACCOUNT_SID=AC{}\nTWILIO_AUTH_TOKEN={twilio}\n",
            hex(32)
        ),
        &[("twilio-api-key", &twilio)],
    );
    let sg = format!("SG.{}.{}", alnum(22), alnum(43));
    b.plant(
        "etc/postfix/sendgrid.env",
        &format!("SENDGRID_API_KEY={sg}\n"),
        &[("sendgrid-api-key", &sg)],
    );
    let npm = format!("npm_{}", alnum(36));
    b.plant(
        "home/dev/.npmrc",
        &format!("registry=https://registry.npmjs.org/\n//registry.npmjs.org/:_authToken={npm}\n"),
        &[("npm-token", &npm)],
    );
    let pypi = format!("pypi-AgEIcHlwaS5vcmc{}", alnum(80));
    b.plant(
        "home/dev/.pypirc",
        &format!(
            "[distutils]\nindex-servers = pypi\n\n[pypi]\nusername = __token__\npassword = {pypi}\n"
        ),
        &[("pypi-token", &pypi)],
    );
    let hvs = format!("hvs.{}", alnum(90));
    b.plant(
        "etc/vault/agent.env",
        &format!("VAULT_ADDR=https://vault.internal:8200\nVAULT_TOKEN={hvs}\n"),
        &[("vault-token", &hvs)],
    );
    let tfc = format!("{}.atlasv1.{}", alnum(14), alnum(67));
    b.plant(
        "root/.terraform.d/credentials.tfrc.json",
        &format!("{{\n  \"credentials\": {{\n    \"app.terraform.io\": {{\n      \"token\": \"{tfc}\"\n    }}\n  }}\n}}\n"),
        &[("terraform-cloud-token", &tfc)],
    );
    let openai = format!("sk-proj-{}T3BlbkFJ{}", alnum(74), alnum(74));
    b.plant(
        "home/dev/.config/openai.env",
        &format!("OPENAI_API_KEY={openai}\n"),
        &[("openai-api-key", &openai)],
    );
    let ant = format!("sk-ant-api03-{}-{}AA", alnum(60), alnum(33));
    b.plant(
        "home/dev/.config/anthropic.env",
        &format!("ANTHROPIC_API_KEY={ant}\n"),
        &[("anthropic-api-key", &ant)],
    );
    let url_b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let jwt = format!(
        "{}.{}.{}",
        url_b64.encode(r#"{"alg":"HS256","typ":"JWT"}"#),
        url_b64.encode(format!(r#"{{"sub":"svc-{}","iat":1716239022}}"#, alnum(8))),
        from_set(
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
            43
        )
    );
    b.plant(
        "var/lib/app/session.http",
        &format!("GET /v1/orders HTTP/1.1\nHost: api.internal\nAuthorization: Bearer {jwt}\n"),
        &[("jwt", &jwt)],
    );

    // --- Credential files, by their structure
    let docker_pw = password();
    let docker_auth =
        base64::engine::general_purpose::STANDARD.encode(format!("deploy:{docker_pw}"));
    b.plant(
        "root/.docker/config.json",
        &format!("{{\n  \"auths\": {{\n    \"registry.example.com\": {{\n      \"auth\": \"{docker_auth}\"\n    }}\n  }}\n}}\n"),
        &[("docker-config-auth", &docker_auth)],
    );
    let netrc = password();
    b.plant(
        "root/.netrc",
        &format!("machine git.example.com\n  login deploy\n  password {netrc}\n"),
        &[("netrc-password", &netrc)],
    );
    let pg = password();
    b.plant(
        "var/lib/postgresql/.pgpass",
        &format!("# hostname:port:database:username:password\ndb.internal:5432:shop:shop:{pg}\n"),
        &[("pgpass-password", &pg)],
    );
    let my = password();
    b.plant(
        "root/.my.cnf",
        &format!("[client]\nuser=root\npassword={my}\n"),
        &[("mysql-config-password", &my)],
    );
    let smb = password();
    b.plant(
        "root/.smbcredentials",
        &format!("username=backup\npassword={smb}\ndomain=CORP\n"),
        &[("smb-credentials", &smb)],
    );
    let gitcred = password();
    b.plant(
        "home/dev/.git-credentials",
        &format!("https://dev:{gitcred}@git.example.com\n"),
        &[("url-password", &gitcred)],
    );
    let pgurl = alnum(16);
    b.plant(
        "etc/shop/database.yml",
        &format!("production:\n  adapter: postgresql\n  url: postgres://shop:{pgurl}@db.internal:5432/shop\n"),
        &[("url-password", &pgurl)],
    );
    let redis = alnum(18);
    b.plant(
        "etc/shop/cache.conf",
        &format!("CACHE_URL=redis://:{redis}@cache.internal:6379/0\n"),
        &[("url-password", &redis)],
    );
    let amqp = alnum(16);
    b.plant(
        "etc/shop/queue.ini",
        &format!("[broker]\nurl = amqp://orders:{amqp}@mq.internal:5672/orders\n"),
        &[("url-password", &amqp)],
    );
    let mongo = alnum(16);
    b.plant(
        "opt/reports/mongo.env",
        &format!("MONGO_URI=mongodb+srv://reports:{mongo}@cluster0.example.net/reports?retryWrites=true\n"),
        &[("url-password", &mongo)],
    );
    let mysqlurl = alnum(16);
    b.plant(
        "opt/legacy/app.properties",
        &format!("db.url=mysql://legacy:{mysqlurl}@10.1.2.3:3306/legacy\n"),
        &[("url-password", &mysqlurl)],
    );
    let kube_token = format!("{}.{}", alnum(6), alnum(16));
    let (kube_key, _) = pem("EC PRIVATE KEY", 121);
    let kube_key_data = base64::engine::general_purpose::STANDARD.encode(&kube_key);
    b.plant(
        "root/.kube/config",
        &format!("apiVersion: v1\nkind: Config\nusers:\n- name: admin\n  user:\n    client-certificate-data: {}\n    client-key-data: {kube_key_data}\n- name: ci\n  user:\n    token: {kube_token}\n", b64(400)),
        &[("kubeconfig-client-key", &kube_key_data), ("kubeconfig-token", &kube_token)],
    );
    let mvn = password();
    b.plant(
        "home/ci/.m2/settings.xml",
        &format!("<settings>\n  <servers>\n    <server>\n      <id>releases</id>\n      <username>deploy</username>\n      <password>{mvn}</password>\n    </server>\n  </servers>\n</settings>\n"),
        &[("maven-settings-password", &mvn)],
    );
    let npm_auth = base64::engine::general_purpose::STANDARD.encode(format!("ci:{}", password()));
    b.plant(
        "home/ci/.npmrc",
        &format!("registry=https://npm.example.com/\n_auth={npm_auth}\nalways-auth=true\n"),
        &[("npmrc-auth", &npm_auth)],
    );
    let pypirc = password();
    b.plant(
        "home/ci/.pypirc",
        &format!("[internal]\nrepository = https://pypi.example.com/\nusername = ci\npassword = {pypirc}\n"),
        &[("pypirc-password", &pypirc)],
    );
    let gh = hex(40);
    b.plant(
        "home/ci/.config/gh/hosts.yml",
        &format!("github.com:\n    user: ci\n    oauth_token: {gh}\n    git_protocol: https\n"),
        &[("gh-cli-token", &gh)],
    );
    let unit = password();
    b.plant(
        "etc/systemd/system/shop.service",
        &format!("[Unit]\nDescription=Shop\n\n[Service]\nEnvironment=\"DB_PASSWORD={unit}\"\nExecStart=/opt/shop/bin/shop\n"),
        &[("systemd-environment-secret", &unit)],
    );
    let hist_pw = password();
    let hist_tok = alnum(32);
    b.plant(
        "root/.bash_history",
        &format!("ls -la\ncd /opt/shop\nmysql -u root -p{hist_pw} shop\nexport API_TOKEN={hist_tok}\nsystemctl restart shop\n"),
        &[("shell-history-secret", &hist_pw), ("shell-history-secret", &hist_tok)],
    );
    let cs = alnum(28);
    b.plant(
        "etc/sso/app.conf",
        &format!("[oauth]\nclient_id = shop-web\nclient_secret = {cs}\n"),
        &[("generic-secret", &cs)],
    );
    // Django's own key alphabet (`get_random_secret_key`): a key may start
    // with `%`, `@` or `*`, or hold `%s` or `$(`, and is still a secret.
    let django = from_set(b"abcdefghijklmnopqrstuvwxyz0123456789!@#$%^&*(-_=+)", 50);
    b.plant(
        "opt/shop/shop/settings.py",
        &format!("DEBUG = False\nSECRET_KEY = '{django}'\nALLOWED_HOSTS = ['shop.example.com']\n"),
        &[("generic-secret", &django)],
    );
    // Structural: credential-named keys with human-chosen values, which
    // the generic rule's entropy bar would not reach.
    let human = format!(
        "{}{}",
        from_set(b"abcdefghijklmnop", 6),
        from_set(b"0123456789", 3)
    );
    let psk = format!(
        "{}{}",
        from_set(b"abcdefghijkl", 7),
        from_set(b"0123456789", 2)
    );
    b.plant(
        "etc/redis/redis.conf",
        &format!("bind 127.0.0.1\nport 6379\nrequirepass {human}\nmaxmemory 256mb\n"),
        &[("config-credential", &human)],
    );
    b.plant(
        "etc/sssd/sssd.conf",
        &format!("[domain/corp]\nid_provider = ldap\nldap_default_bind_dn = cn=sssd,dc=corp\nldap_default_authtok = {psk}\n"),
        &[("config-credential", &psk)],
    );
    let wp = from_set(
        b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&*+-_",
        24,
    );
    let salt = from_set(
        b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&*+-_;:,.<>()[]|",
        64,
    );
    b.plant(
        "var/www/html/wp-config.php",
        &format!("<?php\ndefine( 'DB_NAME', 'wordpress' );\ndefine( 'DB_USER', 'wp' );\ndefine( 'DB_PASSWORD', '{wp}' );\ndefine( 'DB_HOST', 'localhost' );\ndefine( 'AUTH_KEY',         '{salt}' );\n$table_prefix = 'wp_';\n"),
        &[("php-define-secret", &wp), ("php-define-secret", &salt)],
    );
    let yaml_pw = password();
    b.plant(
        "etc/shop/config.yaml",
        &format!("database:\n  host: db.internal\n  user: shop\n  password: \"{yaml_pw}\"\n"),
        &[("generic-secret", &yaml_pw)],
    );

    // --- Look-alikes
    let ed_pub = format!(
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI{} deploy@build\n",
        b64(43)
    );
    b.lookalike("root/.ssh/id_ed25519.pub", &ed_pub);
    b.lookalike(
        "root/.ssh/authorized_keys",
        &format!(
            "{ed_pub}ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ{} ops@laptop\n",
            b64(340)
        ),
    );
    b.lookalike(
        "root/.ssh/known_hosts",
        &format!("|1|{}=|{}= ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBB{}=\n", b64(27), b64(27), b64(87)),
    );
    b.lookalike(
        "usr/share/wordpress/wp-config-sample.php",
        "<?php\ndefine( 'DB_NAME', 'database_name_here' );\ndefine( 'DB_PASSWORD', 'password_here' );\ndefine( 'AUTH_KEY',         'put your unique phrase here' );\n",
    );
    b.lookalike(
        "etc/redis/sentinel.conf",
        "port 26379\n# requirepass foobared\nrequirepass foobared\nsentinel auth-pass mymaster ${REDIS_PASSWORD}\n",
    );
    b.lookalike(
        "etc/app/settings.ini",
        "[db]\npassword = %(db_password)s\npassword_file = /run/secrets/db\ntoken = $(cat /run/secrets/token)\napi_key = <your-api-key>\n",
    );
    b.lookalike("etc/ssl/certs/shop.crt", &pem("CERTIFICATE", 900).0);
    b.lookalike("etc/ssl/certs/shop.pub.pem", &pem("PUBLIC KEY", 294).0);
    b.lookalike(
        "var/cache/downloads/SHA256SUMS",
        &format!(
            "{}  shop-1.4.2.tar.gz\n{}  shop-1.4.3.tar.gz\n",
            hex(64),
            hex(64)
        ),
    );
    b.lookalike(
        "var/cache/downloads/MD5SUMS",
        &format!("{}  shop-1.4.2.tar.gz\n", hex(32)),
    );
    b.lookalike(
        "srv/web/package-lock.json",
        &format!("{{\n  \"packages\": {{\n    \"node_modules/left-pad\": {{\n      \"version\": \"1.3.0\",\n      \"resolved\": \"https://registry.npmjs.org/left-pad/-/left-pad-1.3.0.tgz\",\n      \"integrity\": \"sha512-{}==\"\n    }}\n  }}\n}}\n", b64(86)),
    );
    b.lookalike(
        "etc/shop/ids.conf",
        &format!(
            "instance_uuid = {}-{}-4{}-a{}-{}\nrequest_id: {}-{}-4{}-b{}-{}\n",
            hex(8),
            hex(4),
            hex(3),
            hex(3),
            hex(12),
            hex(8),
            hex(4),
            hex(3),
            hex(3),
            hex(12)
        ),
    );
    let sha = hex(40);
    b.lookalike(
        "srv/repo/.git/packed-refs",
        &format!("# pack-refs with: peeled fully-peeled sorted\n{sha} refs/heads/main\n{} refs/tags/v1.0\n", hex(40)),
    );
    b.lookalike("srv/repo/.git/ORIG_HEAD", &format!("{sha}\n"));
    b.lookalike(
        "srv/repo/CHANGELOG",
        &format!(
            "commit {sha}\nAuthor: Dev <dev@example.com>\n\n    Rotate token handling (see {})\n",
            hex(40)
        ),
    );
    b.lookalike(
        "etc/shop/placeholders.conf",
        "password = changeme\ndb_password: ${DB_PASSWORD}\ntoken: {{ vault_token }}\napi_key = <your-api-key>\nsecret = your-secret-here\npassword=\nclient_secret = REPLACE_WITH_CLIENT_SECRET\n",
    );
    b.lookalike(
        "etc/shop/templated.yaml",
        "database_url: postgres://shop:${DB_PASSWORD}@db:5432/shop\ncache_url: redis://{{ redis_user }}:{{ redis_password }}@cache:6379/0\nsmtp_url: smtp://%s:%s@%s:25\n",
    );
    b.lookalike(
        "usr/share/doc/awscli/examples.txt",
        "aws configure set aws_access_key_id AKIAIOSFODNN7EXAMPLE\naws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n",
    );
    b.lookalike(
        "etc/shop/hashes.conf",
        &format!("password_hash = {}\ntoken_checksum = sha256:{}\npassword_min_length = 12\ntoken_ttl = 3600\n", hex(64), hex(64)),
    );
    b.lookalike(
        "etc/systemd/system/web.service",
        "[Service]\nEnvironment=PYTHONUNBUFFERED=1\nEnvironment=TOKEN_FILE=/run/secrets/token\nEnvironment=DB_PASSWORD=${DB_PASSWORD}\nExecStart=/usr/bin/web\n",
    );
    b.lookalike(
        "home/ci/.docker/config.json",
        "{\n  \"auths\": {\n    \"registry.example.com\": {}\n  },\n  \"credsStore\": \"pass\"\n}\n",
    );
    b.lookalike(
        "home/dev/.bash_history",
        "ls\ncd src\ngit push origin main\nmysql -u root -p shop\nexport PATH=$PATH:/usr/local/bin\nexport DB_PASSWORD=$(cat /run/secrets/db)\n",
    );
    b.lookalike(
        "usr/share/doc/shop/README",
        "Set DATABASE_URL=postgres://user:password@localhost/shop and\nSTRIPE_SECRET_KEY=sk_live_xxxxxxxxxxxxxxxxxxxxxxxx before starting.\nGITHUB_TOKEN=ghp_YOUR_TOKEN_HERE\n",
    );

    b.fx
}

/// Write the fixture to `dir/root` and its manifest to `dir/manifest.json`.
#[allow(dead_code)]
pub fn write_to(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root).expect("mkdir root");
    let fx = generate(&root);
    fs::write(
        dir.join("manifest.json"),
        serde_json::to_string_pretty(&fx).expect("manifest json"),
    )
    .expect("write manifest");
    root
}
