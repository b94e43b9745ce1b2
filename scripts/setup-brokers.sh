#!/usr/bin/env bash
# setup-brokers.sh - idempotently install, configure and start the message
# brokers deploybus talks to on a Debian 12 host (no systemd as PID 1):
#
#   RabbitMQ  AMQP   127.0.0.1:5672   (existing listener, preserved)
#   RabbitMQ  STOMP  127.0.0.1:61613  (rabbitmq_stomp plugin, loopback only)
#   ActiveMQ  STOMP  127.0.0.1:61614  (Debian "main" instance)
#   ActiveMQ  OpenWire 127.0.0.1:61616
#
# Must run as root. Safe to re-run: it only changes/restarts what is not
# already in the desired state. Logs one line per step to stderr; the output
# of the commands it runs goes to $SETUP_BROKERS_LOG.
set -Eeuo pipefail

LOG_FILE="${SETUP_BROKERS_LOG:-/var/log/deploybus-setup-brokers.log}"
# Brokers, plus what the test suite needs from Debian: git, libsystemd-dev and
# pkg-config (to build systemd-python), chromium (browser tests), haproxy (drain),
# gdb (stops an agent at the exact rename of `current` in the crash tests);
# the .deb build and its tests (make deb, tests/packaging): dpkg-dev, debhelper,
# dh-virtualenv, fakeroot, build-essential, python3-venv, chrpath, lintian, and
# systemd for `systemd-analyze verify` (systemd need not be running).
PACKAGES=(${SETUP_PACKAGES:-activemq rabbitmq-server git libsystemd-dev pkg-config chromium haproxy gdb subversion puppet-agent puppet-lint dpkg-dev debhelper dh-virtualenv fakeroot build-essential python3-venv chrpath lintian systemd})

RABBIT_CONF_DIR=/etc/rabbitmq
RABBIT_CONF="$RABBIT_CONF_DIR/rabbitmq.conf"
RABBIT_STOMP_LISTENER="127.0.0.1:61613"

AMQ_INSTANCE=main
AMQ_AVAILABLE="/etc/activemq/instances-available/$AMQ_INSTANCE"
AMQ_ENABLED="/etc/activemq/instances-enabled/$AMQ_INSTANCE"
AMQ_XML="$AMQ_AVAILABLE/activemq.xml"
AMQ_BASE="/var/lib/activemq/$AMQ_INSTANCE"
AMQ_LOG="/var/log/activemq/$AMQ_INSTANCE.log"
AMQ_MARKER="managed by deploybus scripts/setup-brokers.sh"

STEP="init"

log() { printf 'setup-brokers: %s\n' "$*" >&2; }

die() {
    log "FAILED at step '$STEP': $*"
    if [[ -s "$LOG_FILE" ]]; then
        log "last lines of $LOG_FILE:"
        tail -n 20 "$LOG_FILE" | sed 's/^/    /' >&2 || true
    fi
    exit 1
}

on_err() { die "command failed (line $1, exit $2)"; }
trap 'on_err $LINENO $?' ERR

step() {
    STEP="$1"
    log "$1: $2"
    printf '== %s %s: %s\n' "$(date -Is)" "$1" "$2" >>"$LOG_FILE" 2>/dev/null || true
}

# run CMD... with stdin closed and output appended to the log file
run() { "$@" </dev/null >>"$LOG_FILE" 2>&1; }

# true if something accepts TCP connections on HOST:PORT
port_open() {
    timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" </dev/null >/dev/null 2>&1
}

wait_port() { # host port seconds
    local host=$1 port=$2 secs=$3 i
    for ((i = 0; i < secs; i++)); do
        port_open "$host" "$port" && return 0
        sleep 1
    done
    return 1
}

wait_port_closed() { # host port seconds
    local host=$1 port=$2 secs=$3 i
    for ((i = 0; i < secs; i++)); do
        port_open "$host" "$port" || return 0
        sleep 1
    done
    return 1
}

# local addresses listening on TCP port (one per line, e.g. "127.0.0.1:61613", "*:61613")
listen_addrs() { ss -Hltn "sport = :$1" 2>/dev/null | awk '{print $4}'; }

# name of the process listening on TCP port (empty if none / unknown)
listen_proc() {
    ss -Hltnp "sport = :$1" 2>/dev/null | sed -n 's/.*users:(("\([^"]*\)".*/\1/p' | awk 'NR == 1'
}

# true if a STOMP broker on 127.0.0.1:PORT answers CONNECT with CONNECTED
# (HOST is the STOMP host header: the vhost for RabbitMQ, ignored by ActiveMQ)
stomp_ok() { # port host
    STOMP_PORT=$1 STOMP_HOST=$2 timeout 5 bash -c '
        exec 3<>"/dev/tcp/127.0.0.1/$STOMP_PORT" || exit 1
        printf "CONNECT\naccept-version:1.2\nhost:%s\nheart-beat:0,0\n\n\0" "$STOMP_HOST" >&3
        IFS= read -r -d "" frame <&3 || exit 1
        printf "DISCONNECT\n\n\0" >&3
        [[ ${frame%%$'"'"'\n'"'"'*} == CONNECTED ]]
    ' </dev/null >/dev/null 2>&1
}

wait_stomp() { # port host seconds
    local i
    for ((i = 0; i < $3; i++)); do
        stomp_ok "$1" "$2" && return 0
        sleep 1
    done
    return 1
}

# true if the port has a listener that is not bound to 127.0.0.1
listens_beyond_loopback() {
    # (no grep -q in pipelines: an early exit + pipefail gives false negatives)
    listen_addrs "$1" | grep -Ev '^(127\.0\.0\.1|\[::ffff:127\.0\.0\.1\]):' >/dev/null
}

[[ $(id -u) -eq 0 ]] || { STEP="preflight"; die "must run as root"; }
: >>"$LOG_FILE" || { STEP="preflight"; LOG_FILE=/dev/null; die "cannot write $LOG_FILE"; }
export DEBIAN_FRONTEND=noninteractive

# ---------------------------------------------------------------------------
# 1. Debian packages
# ---------------------------------------------------------------------------
pkg_installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]
}

wait_dpkg_lock() {
    local i
    for ((i = 0; i < 900; i++)); do
        if ! fuser /var/lib/dpkg/lock-frontend /var/lib/dpkg/lock \
            /var/lib/apt/lists/lock /var/cache/apt/archives/lock >/dev/null 2>&1; then
            return 0
        fi
        ((i % 30 == 0)) && log "$STEP: waiting for another apt/dpkg process to release its lock"
        sleep 1
    done
    die "apt/dpkg lock still held after 900 s"
}

APT_OPTS=(-y -q -o DPkg::Lock::Timeout=900 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
missing=()
for p in "${PACKAGES[@]}"; do pkg_installed "$p" || missing+=("$p"); done
if ((${#missing[@]})); then
    step "packages" "installing ${missing[*]}"
    wait_dpkg_lock
    # another apt run (e.g. one started in the background) may have just
    # installed them while we waited
    missing=()
    for p in "${PACKAGES[@]}"; do pkg_installed "$p" || missing+=("$p"); done
    if ((${#missing[@]})); then
        run apt-get -q -o DPkg::Lock::Timeout=900 update || die "apt-get update failed"
        wait_dpkg_lock
        run apt-get install "${APT_OPTS[@]}" --no-install-recommends "${missing[@]}" \
            || die "apt-get install ${missing[*]} failed"
    fi
else
    step "packages" "already installed (${PACKAGES[*]})"
fi

# ---------------------------------------------------------------------------
# 2. RabbitMQ (AMQP 5672 + STOMP 61613)
# ---------------------------------------------------------------------------
rabbit_start() {
    run rabbitmq-server -detached || die "rabbitmq-server -detached failed"
    wait_port 127.0.0.1 5672 60 || die "RabbitMQ AMQP did not listen on 127.0.0.1:5672 within 60 s"
}

rabbit_stop() {
    run rabbitmqctl stop || true
    wait_port_closed 127.0.0.1 5672 30 || die "RabbitMQ did not stop"
}

step "rabbitmq-config" "checking $RABBIT_CONF"
rabbit_conf_changed=0
install -d -o rabbitmq -g rabbitmq -m 0755 "$RABBIT_CONF_DIR"
[[ -e "$RABBIT_CONF" ]] || install -o root -g root -m 0644 /dev/null "$RABBIT_CONF"
if [[ -e "$RABBIT_CONF_DIR/advanced.config" ]] && grep -q 'rabbitmq_stomp' "$RABBIT_CONF_DIR/advanced.config"; then
    log "rabbitmq-config: advanced.config configures rabbitmq_stomp; leaving STOMP listener settings alone"
elif grep -Eq '^[[:space:]]*stomp\.listeners\.tcp\.' "$RABBIT_CONF"; then
    grep -Eq "^[[:space:]]*stomp\.listeners\.tcp\.[^=]*=[[:space:]]*${RABBIT_STOMP_LISTENER}[[:space:]]*$" "$RABBIT_CONF" \
        || log "rabbitmq-config: WARNING existing stomp.listeners.tcp.* in $RABBIT_CONF is not $RABBIT_STOMP_LISTENER; preserved as is"
else
    [[ -e "$RABBIT_CONF.orig" ]] || cp -p "$RABBIT_CONF" "$RABBIT_CONF.orig"
    # keep whatever is there (e.g. listeners.tcp.local = 127.0.0.1:5672), just append
    [[ -s "$RABBIT_CONF" && -n "$(tail -c1 "$RABBIT_CONF")" ]] && echo >>"$RABBIT_CONF"
    printf '# deploybus: STOMP on loopback only\nstomp.listeners.tcp.1 = %s\n' \
        "$RABBIT_STOMP_LISTENER" >>"$RABBIT_CONF"
    rabbit_conf_changed=1
    log "rabbitmq-config: added stomp.listeners.tcp.1 = $RABBIT_STOMP_LISTENER (backup $RABBIT_CONF.orig)"
fi

rabbit_owner=""
port_open 127.0.0.1 5672 && rabbit_owner=$(listen_proc 5672)
if [[ -n "$rabbit_owner" && "$rabbit_owner" != beam.smp ]]; then
    STEP="rabbitmq-start"
    die "127.0.0.1:5672 is taken by '$rabbit_owner', not RabbitMQ"
fi
if [[ -n "$rabbit_owner" ]]; then
    # restart if we just changed the config, or if STOMP is up but still bound
    # beyond loopback (config changed earlier but never applied)
    if ((rabbit_conf_changed)) || { [[ -n "$(listen_addrs 61613)" ]] && listens_beyond_loopback 61613 \
        && grep -Eq "^[[:space:]]*stomp\.listeners\.tcp\.[^=]*=[[:space:]]*${RABBIT_STOMP_LISTENER}" "$RABBIT_CONF"; }; then
        step "rabbitmq-start" "restarting RabbitMQ to apply config"
        rabbit_stop
        rabbit_start
    else
        step "rabbitmq-start" "already running on 127.0.0.1:5672"
    fi
else
    step "rabbitmq-start" "starting RabbitMQ (rabbitmq-server -detached)"
    rabbit_start
fi

step "rabbitmq-stomp" "ensuring rabbitmq_stomp plugin is enabled"
# rabbitmq-server -detached returns before the node accepts CLI commands
for ((i = 0; i < 60; i++)); do
    run rabbitmqctl -q await_startup && break
    sleep 1
done
if ! rabbitmq-plugins -q list -e -m 2>/dev/null </dev/null | grep -x 'rabbitmq_stomp' >/dev/null; then
    run rabbitmq-plugins enable rabbitmq_stomp || die "rabbitmq-plugins enable rabbitmq_stomp failed"
fi
wait_stomp 61613 / 60 || die "RabbitMQ STOMP did not answer on 127.0.0.1:61613 within 60 s"
wait_port 127.0.0.1 5672 10 || die "RabbitMQ AMQP no longer listening on 127.0.0.1:5672"

# ---------------------------------------------------------------------------
# 3. ActiveMQ (STOMP 61614 + OpenWire 61616), Debian instance "main"
# ---------------------------------------------------------------------------
step "activemq-config" "checking $AMQ_XML"
install -d -m 0755 "$AMQ_AVAILABLE"
amq_xml_new=$(mktemp)
trap 'rm -f "$amq_xml_new"' EXIT
cat >"$amq_xml_new" <<EOF
<!-- $AMQ_MARKER - edits will be overwritten.
     Only STOMP (61614) and OpenWire (61616) on 127.0.0.1; no AMQP/MQTT/WS
     connectors (those ports belong to RabbitMQ / Mosquitto), no JMX, no web
     console (Debian ships no jetty.xml / webapps). -->
<beans
  xmlns="http://www.springframework.org/schema/beans"
  xmlns:amq="http://activemq.apache.org/schema/core"
  xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
  xsi:schemaLocation="http://www.springframework.org/schema/beans http://www.springframework.org/schema/beans/spring-beans-2.0.xsd
  http://activemq.apache.org/schema/core http://activemq.apache.org/schema/core/activemq-core.xsd">

    <bean class="org.springframework.beans.factory.config.PropertyPlaceholderConfigurer"/>

    <broker xmlns="http://activemq.apache.org/schema/core"
            useJmx="false"
            brokerName="localhost"
            dataDirectory="\${activemq.base}/data">

        <!-- Virtual topics (same as the broker default, made explicit):
             publish to topic VirtualTopic.X, consume from queue Consumer.<name>.VirtualTopic.X -->
        <destinationInterceptors>
            <virtualDestinationInterceptor>
                <virtualDestinations>
                    <virtualTopic name="VirtualTopic.&gt;" prefix="Consumer.*." selectorAware="false"/>
                </virtualDestinations>
            </virtualDestinationInterceptor>
        </destinationInterceptors>

        <persistenceAdapter>
            <kahaDB directory="\${activemq.base}/data/kahadb"/>
        </persistenceAdapter>

        <transportConnectors>
            <transportConnector name="openwire" uri="tcp://127.0.0.1:61616"/>
            <transportConnector name="stomp" uri="stomp://127.0.0.1:61614?transport.closeAsync=false"/>
        </transportConnectors>

    </broker>

</beans>
EOF

amq_conf_changed=0
# install_managed SRC DEST: replace DEST with SRC if they differ (backing up a
# non-managed original once as DEST.orig); sets amq_conf_changed=1 on change
install_managed() {
    local src=$1 dest=$2
    cmp -s "$src" "$dest" && return 0
    if [[ -e "$dest" && ! -e "$dest.orig" ]] && ! grep -q "$AMQ_MARKER" "$dest"; then
        cp -p "$dest" "$dest.orig"
    fi
    install -o root -g root -m 0644 "$src" "$dest"
    amq_conf_changed=1
    log "activemq-config: wrote $dest"
}
install_managed "$amq_xml_new" "$AMQ_XML"

# Per-instance options: /usr/bin/activemq reads this file INSTEAD of
# /usr/share/activemq/activemq-options, so it is a copy of that file plus
# ACTIVEMQ_OUT (the JVM's stdout, where log4j writes) -> log file, not /dev/null.
{
    echo "# $AMQ_MARKER: copy of /usr/share/activemq/activemq-options + ACTIVEMQ_OUT"
    cat /usr/share/activemq/activemq-options
    echo
    echo "ACTIVEMQ_OUT=\"$AMQ_LOG\""
} >"$amq_xml_new"
install_managed "$amq_xml_new" "$AMQ_AVAILABLE/options"

# Debian's ActiveMQ logs through log4j 1.2 (the shipped log4j2.properties is
# ignored), so without this file it logs nothing at all.
cat >"$amq_xml_new" <<EOF
# $AMQ_MARKER
log4j.rootLogger=INFO, stdout
log4j.logger.org.apache.activemq.spring=WARN
log4j.logger.org.springframework=WARN
log4j.logger.org.apache.xbean=WARN
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=%d | %-5p | %m | %c | %t%n
EOF
install_managed "$amq_xml_new" "$AMQ_AVAILABLE/log4j.properties"

if [[ ! -L "$AMQ_ENABLED" && ! -d "$AMQ_ENABLED" ]]; then
    ln -s "$AMQ_AVAILABLE" "$AMQ_ENABLED"
    log "activemq-config: enabled instance $AMQ_INSTANCE ($AMQ_ENABLED)"
fi

# data directory (ACTIVEMQ_BASE); /usr/bin/activemq only mkdirs one level
install -d -o activemq -g activemq -m 0755 "$AMQ_BASE" "$AMQ_BASE/data" "$AMQ_BASE/tmp" "$(dirname "$AMQ_LOG")"

amq_running() { port_open 127.0.0.1 61614 && [[ "$(listen_proc 61614)" == java ]]; }

amq_start() {
    local who
    for port in 61614 61616; do
        if port_open 127.0.0.1 "$port"; then
            who=$(listen_proc "$port")
            [[ "$who" == java ]] || die "port $port is already taken by '${who:-unknown}', ActiveMQ cannot bind it"
        fi
    done
    run /etc/init.d/activemq start || die "/etc/init.d/activemq start failed"
    wait_stomp 61614 localhost 90 \
        || die "ActiveMQ STOMP did not answer on 127.0.0.1:61614 within 90 s (see $AMQ_LOG)"
}

if amq_running && ((amq_conf_changed)); then
    step "activemq-start" "restarting ActiveMQ to apply config"
    run /etc/init.d/activemq stop || true
    wait_port_closed 127.0.0.1 61614 60 || die "ActiveMQ did not stop"
    amq_start
elif amq_running; then
    step "activemq-start" "already running on 127.0.0.1:61614"
else
    step "activemq-start" "starting ActiveMQ (/etc/init.d/activemq start)"
    # a stale pidfile / half-started JVM would make start-stop-daemon a no-op
    if [[ -f /var/run/activemq/$AMQ_INSTANCE.pid ]]; then
        run /etc/init.d/activemq stop || true
        rm -f "/var/run/activemq/$AMQ_INSTANCE.pid"
    fi
    amq_start
fi

# ---------------------------------------------------------------------------
# 4. Final checks
# ---------------------------------------------------------------------------
step "verify" "checking listeners"
port_open 127.0.0.1 5672 || die "RabbitMQ AMQP not listening on 127.0.0.1:5672"
stomp_ok 61613 / || die "RabbitMQ STOMP not answering CONNECT on 127.0.0.1:61613"
wait_stomp 61614 localhost 30 || die "ActiveMQ STOMP not answering CONNECT on 127.0.0.1:61614"
for port in 5672 61613 61614 61616; do
    if listens_beyond_loopback "$port"; then
        log "verify: WARNING port $port also listens beyond loopback: $(listen_addrs "$port" | tr '\n' ' ')"
    fi
done
if [[ -n "$(listen_addrs 8161)" ]] && listens_beyond_loopback 8161; then
    log "verify: WARNING a web console listens on 8161 beyond loopback"
fi

trap - ERR
echo "brokers ready: rabbitmq amqp 127.0.0.1:5672, rabbitmq stomp 127.0.0.1:61613, activemq stomp 127.0.0.1:61614"
