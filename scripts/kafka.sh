#!/usr/bin/env bash
# Local single-node Apache Kafka (KRaft) for development, tests and CI.
#
#   scripts/kafka.sh fetch    download the pinned broker jars from Maven Central (once)
#   scripts/kafka.sh start    format storage if needed, start on 127.0.0.1, wait until it answers
#   scripts/kafka.sh stop     stop it (SIGTERM, then SIGKILL after 20 s)
#   scripts/kafka.sh status   say whether it runs and answers (exit 0 only if it answers)
#   scripts/kafka.sh reset    stop and delete all topics and data
#
# Settings (environment): KAFKA_PORT (9092), KAFKA_CONTROLLER_PORT (9093),
# KAFKA_HOME_DIR (<repo>/kafka), KAFKA_HEAP (512m).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KDIR="${KAFKA_HOME_DIR:-$ROOT/kafka}"
PORT="${KAFKA_PORT:-9092}"
CPORT="${KAFKA_CONTROLLER_PORT:-9093}"
HEAP="${KAFKA_HEAP:-512m}"
LIB="$KDIR/lib"
DATA="$KDIR/data/$PORT"
RUN="$KDIR/run/$PORT"
PIDFILE="$RUN/kafka.pid"
CONF="$RUN/server.properties"

log() { echo "[kafka] $*" >&2; }

fetch() {
  if compgen -G "$LIB/kafka_2.13-*.jar" >/dev/null; then
    return 0
  fi
  command -v mvn >/dev/null || { log "Maven (mvn) is required to fetch the broker jars"; exit 1; }
  log "fetching broker jars from Maven Central into $LIB"
  mvn -q -B -f "$KDIR/pom.xml" dependency:copy-dependencies \
      -DoutputDirectory="$LIB" -DincludeScope=runtime
}

answers() {
  # A real Metadata request (api key 3, v1, all topics) over the wire: the broker answers
  # only once its listener is up and it has joined the KRaft quorum.
  python3 - "$PORT" <<'PY' 2>/dev/null
import socket, struct, sys
port = int(sys.argv[1])
client = b"advrec-probe"
body = struct.pack(">hhih", 3, 1, 42, len(client)) + client + struct.pack(">i", -1)
with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
    s.sendall(struct.pack(">i", len(body)) + body)
    head = s.recv(8)
    size, corr = struct.unpack(">ii", head)
    data = b""
    while len(data) < size - 4:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    brokers = struct.unpack(">i", data[:4])[0]
sys.exit(0 if corr == 42 and brokers >= 1 else 1)
PY
}

running() { [[ -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

write_conf() {
  mkdir -p "$RUN" "$DATA"
  cat >"$CONF" <<CONF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$CPORT
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CPORT
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$DATA
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
log.retention.hours=24
CONF
}

start() {
  fetch
  if running && answers; then log "already running on 127.0.0.1:$PORT"; return 0; fi
  write_conf
  local cp; cp="$(ls "$LIB"/*.jar | tr '\n' ':')"
  if [[ ! -f "$DATA/meta.properties" ]]; then
    log "formatting storage in $DATA"
    java -cp "$cp" kafka.tools.StorageTool format -t "advrec-dev-cluster-$PORT" -c "$CONF" \
      --ignore-formatted >"$RUN/format.log" 2>&1 \
      || { cat "$RUN/format.log" >&2; exit 1; }
  fi
  : >"$RUN/server.log"
  log "starting broker on 127.0.0.1:$PORT (log: $RUN/server.log)"
  nohup java "-Xms$HEAP" "-Xmx$HEAP" -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j.configuration="file:$KDIR/log4j.properties" \
    -cp "$cp" kafka.Kafka "$CONF" >>"$RUN/server.log" 2>&1 &
  echo $! >"$PIDFILE"
  for _ in $(seq 1 120); do
    if answers; then log "ready"; return 0; fi
    running || { log "broker exited during start-up:"; tail -n 30 "$RUN/server.log" >&2; exit 1; }
    sleep 0.5
  done
  log "broker did not answer within 60 s"; tail -n 30 "$RUN/server.log" >&2; exit 1
}

stop() {
  running || { log "not running"; rm -f "$PIDFILE"; return 0; }
  local pid; pid="$(cat "$PIDFILE")"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  if kill -0 "$pid" 2>/dev/null; then log "SIGKILL after 20 s"; kill -9 "$pid" || true; fi
  rm -f "$PIDFILE"
  log "stopped"
}

case "${1:-}" in
  fetch) fetch ;;
  start) start ;;
  stop) stop ;;
  status)
    if answers; then echo "running on 127.0.0.1:$PORT (pid $(cat "$PIDFILE" 2>/dev/null || echo ?))"
    elif running; then echo "started (pid $(cat "$PIDFILE")) but not answering on 127.0.0.1:$PORT"; exit 1
    else echo "not running"; exit 1; fi ;;
  reset) stop; rm -rf "$DATA" ;;
  *) echo "usage: $0 {fetch|start|stop|status|reset}" >&2; exit 2 ;;
esac
