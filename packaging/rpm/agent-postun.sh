# amiprep-agent %postun. No restart on upgrade: the agent's own `prepare`
# runs dnf inside the agent's unit, and restarting it here would kill that
# dnf mid-transaction. The new binary takes over at the next start.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
