#!/usr/bin/env bash
# A real single-node Slurm (munged + slurmctld + slurmd on localhost, 2 CPUs) for the tests in tests/slurm/.
#
#   bash tests/slurm/cluster.sh start   # as root: apt-installs Slurm/munge/PMIx/Open MPI if missing, starts the daemons
#   bash tests/slurm/cluster.sh stop    # cancels leftover jobs, stops the daemons by PID
#   bash tests/slurm/cluster.sh logs    # prints the daemons' logs
#
# .ci/run calls `start` before `make test` and `stop` on exit. The tests learn which case they are in from
# $SLURM_CI_DIR/status, which `start` writes first thing: absent -> nobody tried to start a cluster (the
# tests skip); "ready" -> use it; anything else -> the start failed and the tests FAIL with that reason and
# the logs, so a broken CI setup shows up red instead of silently skipped.
#
# Facts this relies on (checked on Debian 12, Slurm 22.05; see the project's slurm-single-node notes):
# libpmix2 must be installed before slurmd starts or `srun --mpi=pmix` cannot load it; proctrack/pgid with
# task/none works in a container where cgroups may not; cred_expire=10 cuts a requeued job's restart delay
# from ~150 s to ~15 s; ReturnToService=2 brings the node back idle after a restart.
set -uo pipefail

DIR=${SLURM_CI_DIR:-/tmp/ds_fp4-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by ds_fp4 tests/slurm/cluster.sh"
PACKAGES="slurm-wlm munge libpmix2 openmpi-bin libopenmpi-dev"

say() { echo "cluster.sh: $*" >&2; }
status() { echo "$*" > "$DIR/status"; }
fail() { say "FAILED: $*"; status "failed: $*"; logs; exit 1; }

write_conf() {
    cat > "$CONF" <<EOF
$MARK (safe to delete)
ClusterName=ci
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=5
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.log
MpiDefault=pmix
MailProg=/bin/true
ReturnToService=2
MinJobAge=3600
KillWait=10
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    [ "$(id -u)" = 0 ] || { echo "cluster.sh: needs root (installs packages, runs slurmd)" >&2; exit 1; }
    local t0=$SECONDS
    mkdir -p "$DIR"
    status "starting"
    if [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null \
        && [ "$(sinfo -h -o %t 2>/dev/null)" = idle ]; then
        status "ready"
        say "already running (state and logs in $DIR)"
        return 0
    fi
    local missing=""
    for bin in sbatch slurmctld slurmd munged mpirun mpicc; do command -v "$bin" >/dev/null || missing=1; done
    [ -e /usr/lib/x86_64-linux-gnu/libpmix.so.2 ] || ls /usr/lib/*/libpmix.so.2 >/dev/null 2>&1 || missing=1
    if [ -n "$missing" ]; then
        say "installing $PACKAGES"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            $PACKAGES; } > "$DIR/apt.log" 2>&1 || { tail -20 "$DIR/apt.log" >&2; fail "apt-get install failed"; }
    fi
    local t_apt=$((SECONDS - t0))
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        fail "$CONF exists and was not written by this script; refusing to overwrite it"
    fi
    rm -rf "$DIR/state" "$DIR/spool" "$DIR"/*.log "$DIR"/*.pid
    mkdir -p "$DIR/state" "$DIR/spool"
    write_conf

    [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key || fail "no munge key"
    install -d -o munge -g munge -m 755 /run/munge
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        su -s /bin/sh munge -c /usr/sbin/munged || fail "munged did not start"
        cp /run/munge/munged.pid "$DIR/munged.pid"  # ours to stop; a munged found running is left alone
    fi
    slurmctld || fail "slurmctld did not start"
    slurmd -N localhost || fail "slurmd did not start"
    local state=""
    for _ in $(seq 120); do
        state=$(sinfo -h -o %t 2>/dev/null)
        [ "$state" = idle ] && break
        sleep 0.5
    done
    [ "$state" = idle ] || fail "the node did not become idle within 60 s (sinfo: '${state}')"
    status "ready"
    say "Slurm ready in $((SECONDS - t0)) s (packages: ${t_apt} s); state and logs in $DIR"
}

stop() {
    if command -v scancel >/dev/null && [ -f "$DIR/slurmctld.pid" ]; then
        squeue -h -o %i 2>/dev/null | xargs -r scancel --quiet --full 2>/dev/null || true  # one argument per id
        for _ in $(seq 30); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 1; done
    fi
    local pids=""
    for f in "$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$DIR/munged.pid"; do
        [ -f "$f" ] && pids="$pids $(cat "$f")"
    done
    for pid in $pids; do kill "$pid" 2>/dev/null; done
    for _ in $(seq 50); do
        local alive=""
        for pid in $pids; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ -z "$alive" ] && break
        sleep 0.2
    done
    for pid in $pids; do kill -9 "$pid" 2>/dev/null; done
    rm -f "$DIR/status" "$DIR"/*.pid
    say "stopped (pids:${pids:- none})"
}

logs() {
    for f in "$DIR/slurmctld.log:60" "$DIR/slurmd.log:60" "$DIR/jobcomp.log:10"; do
        [ -f "${f%:*}" ] && { echo "===== ${f%:*} (last ${f##*:} lines)"; tail -n "${f##*:}" "${f%:*}"; }
    done
    return 0
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    logs) logs ;;
    *) echo "usage: $0 start|stop|logs" >&2; exit 2 ;;
esac
