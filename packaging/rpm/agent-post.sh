# amiprep-agent %post. Installed, neither enabled nor started: the agent needs
# certificates and a controller address first (docs/INSTALL.md).
if [ "$1" -eq 1 ] && [ ! -e /etc/amiprep/pki ]; then
    install -d -m 0700 /etc/amiprep/pki
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
