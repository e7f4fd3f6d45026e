# amiprep-controller %postun: reload systemd; on upgrade, restart the
# controller if it was running.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart amiprep-controller.service >/dev/null 2>&1 || :
    fi
fi
