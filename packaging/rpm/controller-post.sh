# amiprep-controller %post: create the `amiprep` user, the key directory, and
# reload systemd. Not enabled: it needs certificates first (docs/INSTALL.md).
systemd-sysusers /usr/lib/sysusers.d/amiprep.conf
if [ "$1" -eq 1 ]; then
    # First installation: keys root:amiprep 0640 in a directory only root
    # and amiprep can enter (agent keys there stay 0600 root).
    if [ -d /etc/amiprep/pki ]; then
        chgrp amiprep /etc/amiprep/pki && chmod 0750 /etc/amiprep/pki
    else
        install -d -m 0750 -o root -g amiprep /etc/amiprep/pki
    fi
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
