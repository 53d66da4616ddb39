"""Turns the raw results of tests/bench/compare.sh into ONE table (stdout) and, given a second
argument, the same table as markdown with the machine, the versions and the fleet summary.

    report.py WORKDIR [OUT.md]

WORKDIR holds results.txt ("key value" lines; a key may repeat: its median is used),
cold.json (hyperfine --export-json) and fleet.txt.
"""
import json
import os
import statistics
import sys

work = sys.argv[1]
out_path = sys.argv[2] if len(sys.argv) > 2 else None

raw = {}
with open(os.path.join(work, "results.txt")) as f:
    for line in f:
        k, _, v = line.rstrip("\n").partition(" ")
        if k:
            raw.setdefault(k, []).append(v)


def num(k):
    vals = []
    for v in raw.get(k, []):
        try:
            x = float(v)
        except ValueError:
            continue
        if x == x:  # not NaN
            vals.append(x)
    return statistics.median(vals) if vals else None


def text(k, default=""):
    return raw.get(k, [default])[-1]


def count(k):
    return len(raw.get(k, []))


cold = {}
try:
    with open(os.path.join(work, "cold.json")) as f:
        for r in json.load(f)["results"]:
            cold[r["command"]] = r
except (OSError, ValueError, KeyError):
    pass


def cold_median(name):
    r = cold.get(name)
    return r["median"] if r else None


def ms(s):
    return "n/a" if s is None else (f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s")


def kib(k):
    return "n/a" if k is None else f"{k / 1024:.1f} MiB"


def ratio(a, b, what):
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.3g}× {what}"


def verdict(value, limit, smaller_is_better=True):
    if value is None or limit is None:
        return "n/a"
    ok = value <= limit if smaller_is_better else value >= limit
    return "**met**" if ok else "**missed**"


rows = []  # (section, subject, median, ratio, goal, result)


def row(section, subject, median, rat="", goal="", result=""):
    rows.append((section, subject, median, rat, goal, result))


# ---- 1 cold
f_ = cold_median("iotcred fetch (file key)")
h_ = cold_median("iotcred fetch (SoftHSM key)")
c_ = cold_median("curl")
b_ = cold_median("boto3-refresh-session")
a_ = cold_median("awscrt")
n_cold = min((len(r.get("times", [])) for r in cold.values()), default=0)
S1 = "1 cold exchange"
row(S1, "iotcred fetch, file key", ms(f_),
    f"{ratio(f_, c_, 'curl')}; {ratio(f_, b_, 'BRS')}", "≤ 2× curl; ≤ 0.03× BRS",
    f"{verdict(f_ and c_ and f_ / c_, 2)} / {verdict(f_ and b_ and f_ / b_, 0.03)}")
row(S1, "iotcred fetch, SoftHSM key", ms(h_), ratio(h_, f_, "file key"), "≤ 1.5× file key",
    verdict(h_ and f_ and h_ / f_, 1.5))
row(S1, "curl --cert --key --cacert", ms(c_), "1 (reference)")
row(S1, "boto3-refresh-session (IoT method)", ms(b_), ratio(b_, c_, "curl"))
row(S1, "awscrt new_x509 provider", ms(a_), ratio(a_, c_, "curl"))

# ---- 2 warm
ik = num("warm_iotcred_keepalive")
inew = num("warm_iotcred_newconn")
cr = num("warm_curl_reused")
cf = num("warm_curl_first")
wb = num("warm_brs")
wa = num("warm_crt")
S2 = "2 warm refresh"
ci = num("warm_curl_idle")
row(S2, f"iotcred, timer-driven refresh on its kept-alive connection, 16 s apart (n={count('warm_iotcred_keepalive')})",
    ms(ik), f"{ratio(ik, ci, 'curl 15 s apart')}; {ratio(ik, cr, 'curl back-to-back')}",
    "≤ 1.2× curl",
    f"{verdict(ik and ci and ik / ci, 1.2)} (15 s apart) / {verdict(ik and cr and ik / cr, 1.2)} (back-to-back)")
row(S2, f"iotcred, refresh on a new connection (SIGHUP, identity changed; n={count('warm_iotcred_newconn')})",
    ms(inew), ratio(inew, cf, "curl 1st transfer"))
ihn = num("warm_iotcred_hsm_newconn")
row(S2, f"iotcred, SoftHSM key, refresh on a new connection (SIGHUP; n={count('warm_iotcred_hsm_newconn')})",
    ms(ihn), ratio(ihn, inew, "file key"))
row(S2, f"curl, one invocation, reused connection, transfers 15 s apart (--rate 4/m; n={count('warm_curl_idle')})",
    ms(ci), "1 (reference)")
row(S2, f"curl, several URLs in one invocation: reused connection, back-to-back (n={count('warm_curl_reused')})",
    ms(cr), "1 (reference)")
row(S2, "curl, same invocation: first transfer (TCP + TLS + exchange)", ms(cf), "")
row(S2, f"boto3-refresh-session, forced refresh (n={count('warm_brs')})", ms(wb),
    ratio(wb, cr, "curl reused"))
row(S2, f"awscrt, new provider per call, one TLS context (n={count('warm_crt')})", ms(wa),
    ratio(wa, cr, "curl reused"))

# ---- 3 serving
S3 = "3 local serving"


def serve(subject, transport):
    p = f"serve_{subject}_{transport}_"
    return num(p + "rps"), num(p + "p50_us"), num(p + "p99_us"), num(p + "errors")


def fmt_serve(rps, p50, p99, errors=None):
    if rps is None:
        return "n/a"
    e = f", {errors:.0f} errors" if errors else ""
    return f"{rps:,.0f} req/s, p50 {p50:.0f} µs, p99 {p99:.0f} µs{e}"


for transport, label in (("tcp", "loopback TCP"), ("unix", "Unix socket")):
    i = serve("iotcred", transport)
    n = serve("nginx", transport)
    rr = i[0] / n[0] if i[0] and n[0] else None
    pr = i[2] / n[2] if i[2] and n[2] else None
    row(S3, f"iotcred, {label} (loadgen)", fmt_serve(*i),
        f"{rr:.3g}× nginx req/s; p99 {pr:.3g}× nginx" if rr and pr else "n/a",
        "≥ 1.0× req/s; p99 ≤ 1.0×",
        f"{verdict(rr, 1.0, False)} / {verdict(pr, 1.0)}")
    row(S3, f"nginx static file, {label} (loadgen)", fmt_serve(*n), "1 (reference)")
wi = (num("wrk_iotcred_rps"), num("wrk_iotcred_p50_us"), num("wrk_iotcred_p99_us"))
wn = (num("wrk_nginx_rps"), num("wrk_nginx_p50_us"), num("wrk_nginx_p99_us"))
wr = wi[0] / wn[0] if wi[0] and wn[0] else None
wp = wi[2] / wn[2] if wi[2] and wn[2] else None
row(S3, "iotcred, loopback TCP (wrk -t2, cross-check)", fmt_serve(*wi),
    f"{wr:.3g}× nginx req/s; p99 {wp:.3g}× nginx" if wr and wp else "n/a")
row(S3, "nginx, loopback TCP (wrk -t2, cross-check)", fmt_serve(*wn), "1 (reference)")
ii = serve("iotcred", "imds")
ni = serve("nginx", "imds")
ir_ = ii[0] / ni[0] if ii[0] and ni[0] else None
ip_ = ii[2] / ni[2] if ii[2] and ni[2] else None
row(S3, "iotcred IMDS credential GET, loopback TCP (loadgen)", fmt_serve(*ii),
    f"{ir_:.3g}× nginx req/s; p99 {ip_:.3g}× nginx" if ir_ and ip_ else "n/a",
    "≥ 1.0× req/s; p99 ≤ 1.0×",
    f"{verdict(ir_, 1.0, False)} / {verdict(ip_, 1.0)}")
row(S3, "nginx static file, same IMDS path and body, token header checked (loadgen)",
    fmt_serve(*ni), "1 (reference)")
for fam, label in (("v4", "127.0.0.1"), ("v6", "::1")):
    lp50, lp99 = num(f"uid_lookup_{fam}_p50_us"), num(f"uid_lookup_{fam}_p99_us")
    cp50, cp99 = num(f"uid_connect_{fam}_p50_us"), num(f"uid_connect_{fam}_p99_us")
    row(S3, f"peer uid lookup (NETLINK_SOCK_DIAG, once per connection), {label}",
        "n/a" if lp50 is None else f"p50 {lp50:.1f} µs, p99 {lp99:.1f} µs",
        "n/a" if cp50 is None else f"connect+accept alone: p50 {cp50:.1f} µs, p99 {cp99:.1f} µs")

# ---- 4 footprint
S4 = "4 footprint"
mil = num("million")
mil_s = f"{mil:,.0f}" if mil else "?"
ir, ih = num("idle_rss_file"), num("idle_hwm_file")
row(S4, "iotcred agent idle, file key: VmRSS / VmHWM", f"{kib(ir)} / {kib(ih)}", "",
    "RSS ≤ 4 MiB", verdict(ir, 4096))
im = num("idle_rss_min")
row(S4, "iotcred agent idle, file key, --min-size build: VmRSS / VmHWM",
    "n/a" if im is None else f"{kib(im)} / {kib(num('idle_hwm_min'))}", "",
    "RSS ≤ 4 MiB", verdict(im, 4096))
row(S4, "iotcred agent idle, SoftHSM key: VmRSS / VmHWM",
    f"{kib(num('idle_rss_hsm'))} / {kib(num('idle_hwm_hsm'))}", "")
for n, label in (("file", "file key"), ("hsm", "SoftHSM key")):
    err = num(f"after_errors_{n}")
    row(S4, f"iotcred agent after {mil_s} requests, {label}: VmRSS / VmHWM",
        f"{kib(num(f'after_rss_{n}'))} / {kib(num(f'after_hwm_{n}'))}",
        f"{err:.0f} errors" if err else "")
row(S4, "iotcred fetch (cold, one exchange): peak RSS, file / SoftHSM",
    f"{kib(num('cold_rss_iotcred_file'))} / {kib(num('cold_rss_iotcred_hsm'))}", "")
row(S4, "curl (one exchange): peak RSS", kib(num("cold_rss_curl")), "")
row(S4, "boto3-refresh-session process: peak RSS cold / after warm refreshes",
    f"{kib(num('cold_rss_brs'))} / {kib(num('proc_hwm_brs'))}", "")
row(S4, "awscrt process: peak RSS cold / after warm refreshes",
    f"{kib(num('cold_rss_crt'))} / {kib(num('proc_hwm_crt'))}", "")
nw = raw.get("nginx_worker_rss", [])
row(S4, f"nginx after the serving runs: {len(nw)} worker(s) VmRSS each (median) / master",
    f"{kib(num('nginx_worker_rss'))} / {kib(num('nginx_master_rss'))}", "")
sx, sa = num("size_x86_64"), num("size_aarch64")
row(S4, "stripped binary, x86_64", "n/a" if sx is None else f"{sx / 1048576:.2f} MiB ({sx:,.0f} B)", "")
sxm = num("size_x86_64_min")
row(S4, "stripped binary, x86_64, --min-size", "n/a" if sxm is None else f"{sxm / 1048576:.2f} MiB ({sxm:,.0f} B)", "")
row(S4, "stripped binary, aarch64 (stable, cross/build.sh)", "skipped/failed" if sa is None else f"{sa / 1048576:.2f} MiB ({sa:,.0f} B)",
    "", "≤ 2 MiB", verdict(sa, 2 * 1048576))
sm = num("size_aarch64_min")
row(S4, "stripped binary, aarch64 (cross/build.sh --min-size: nightly build-std; the arm64 .deb)",
    "skipped/failed" if sm is None else f"{sm / 1048576:.2f} MiB ({sm:,.0f} B)",
    "", "≤ 2 MiB", verdict(sm, 2 * 1048576))
idle_s = num("idle_seconds")
for n, label in (("file", "file key"), ("hsm", "SoftHSM key")):
    w = num(f"idle_wakeups_{n}")
    row(S4, f"idle wakeups over {idle_s:.0f} s ({label}; Σ voluntary_ctxt_switches, all threads)",
        "n/a" if w is None else f"{w:.0f}", "", "0 (no watchdog)", verdict(w, 0) if n == "file" else "")

# ---- 5 fleet
fleet = ""
try:
    with open(os.path.join(work, "fleet.txt")) as f:
        full = f.read().rstrip()
    # The summary lines of each scenario; the per-minute tables stay in fleet.txt.
    keep, skipping = [], False
    for line in full.splitlines():
        if line.startswith("===") or not line.startswith("  "):
            skipping = False
        elif line.rstrip().endswith(":") and not line.startswith("    "):
            skipping = True
        if not skipping and line.strip():
            keep.append(line)
    fleet = "\n".join(keep)
except OSError:
    pass

# ---- output
headers = ("benchmark", "subject", "median", "ratio", "goal", "result")


def plain():
    widths = [max(len(str(r[i])) for r in rows + [headers]) for i in range(len(headers))]
    lines = []
    last = None
    for r in [headers] + rows:
        sec = r[0] if r[0] != last else ""
        last = r[0]
        cells = [sec] + [str(c) for c in r[1:]]
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip().replace("**", ""))
    return "\n".join(lines)


def markdown():
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    last = None
    for r in rows:
        sec = r[0] if r[0] != last else ""
        last = r[0]
        out.append("| " + " | ".join([sec] + [str(c) for c in r[1:]]) + " |")
    return "\n".join(out)


versions = ", ".join(f"{k[len('version_'):]} {v[-1]}" for k, v in sorted(raw.items()) if k.startswith("version_"))
machine = (f"{text('machine_nproc')} cores, {text('machine_cpu')}, Linux {text('machine_kernel')}, "
           f"{text('machine_rustc')}")
print(plain())
print()
print(f"machine: {machine}")
print(f"peers: {versions}")
if fleet:
    print("\nfleet simulation (seed 42):\n" + fleet)

if out_path:
    with open(out_path, "w") as f:
        f.write(f"Machine: {machine}  \nPeers: {versions}  \nMode: {text('mode')}\n\n")
        f.write(markdown() + "\n")
        if fleet:
            f.write("\nFleet simulation (`cargo run -p iotcred-core --release --example fleet -- 42`):\n\n")
            f.write("```text\n" + fleet + "\n```\n")
    print(f"\nmarkdown written to {out_path}")
