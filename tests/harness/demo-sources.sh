#!/usr/bin/env bash
# Starts a real OCI registry and Prometheus on loopback for the demo, with sample data, and prints
# their addresses as shell variables. PIDs go into the cluster's state, so `make down` stops them.
#   demo-sources.sh STATE_DIR
set -euo pipefail
STATE=$1
DIR="$STATE/demo-sources"
mkdir -p "$DIR" "$STATE/pids" "$STATE/logs"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
record() { echo "$2" >"$STATE/pids/$1"; readlink -f "$(command -v "$3")" >"$STATE/pids/$1.exe"; }

REG_PORT=$(port)
cat >"$DIR/registry.yml" <<YML
version: 0.1
log: {level: warn}
storage: {filesystem: {rootdirectory: $DIR/registry}}
http: {addr: 127.0.0.1:$REG_PORT}
YML
setsid docker-registry serve "$DIR/registry.yml" >"$STATE/logs/registry.log" 2>&1 </dev/null 8>&- 9>&- &
record registry $! docker-registry
REG="http://127.0.0.1:$REG_PORT"
for _ in $(seq 1 100); do curl -fsS "$REG/v2/" >/dev/null 2>&1 && break; sleep 0.1; done

# Seeds test/myapp with four tiny images through the registry API.
blob() { # repo data-file -> digest
  local d="sha256:$(sha256sum "$2" | cut -d' ' -f1)" loc
  loc=$(curl -fsS -X POST -D - -o /dev/null "$REG/v2/$1/blobs/uploads/" | tr -d '\r' | sed -n 's/^[Ll]ocation: //p')
  [[ "$loc" == http* ]] || loc="$REG$loc"
  curl -fsS -X PUT -H 'Content-Type: application/octet-stream' --data-binary "@$2" "$loc&digest=$d" >/dev/null
  echo "$d"
}
for tag in v1.0.0 v1.1.0 v2.0.0 edge; do
  printf '{"architecture":"amd64","os":"linux","tag":"%s"}' "$tag" >"$DIR/config.json"
  printf 'layer %s' "$tag" >"$DIR/layer"
  c=$(blob test/myapp "$DIR/config.json"); l=$(blob test/myapp "$DIR/layer")
  printf '{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{"mediaType":"application/vnd.docker.container.image.v1+json","size":%d,"digest":"%s"},"layers":[{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","size":%d,"digest":"%s"}]}' \
    "$(stat -c%s "$DIR/config.json")" "$c" "$(stat -c%s "$DIR/layer")" "$l" |
    curl -fsS -X PUT -H 'Content-Type: application/vnd.docker.distribution.manifest.v2+json' --data-binary @- "$REG/v2/test/myapp/manifests/$tag" >/dev/null
done

# Prometheus with a day of CI runner containers, for the seed's dev-prometheus query.
PROM_PORT=$(port)
now=$(date +%s)
{
  echo '# TYPE container_memory_working_set_bytes gauge'
  for img in docker.io/library/golang:1.23 docker.io/library/node:22 docker.io/library/python:3.12; do
    n=$(( ${#img} % 3 + 1 ))
    for c in $(seq 1 "$n"); do
      for ((t = now - 26*3600; t <= now + 6*3600; t += 300)); do
        echo "container_memory_working_set_bytes{namespace=\"build-stuff\",pod=\"runner-$c\",container=\"job\",image=\"$img\"} 1 $t"
      done
    done
  done
  echo '# EOF'
} >"$DIR/samples.om"
rm -rf "$DIR/prometheus"
promtool tsdb create-blocks-from openmetrics "$DIR/samples.om" "$DIR/prometheus" >/dev/null
printf 'global: {scrape_interval: 1h}\n' >"$DIR/prometheus.yml"
setsid prometheus --config.file="$DIR/prometheus.yml" --storage.tsdb.path="$DIR/prometheus" \
  --web.listen-address="127.0.0.1:$PROM_PORT" --storage.tsdb.retention.time=30d \
  >"$STATE/logs/prometheus.log" 2>&1 </dev/null 8>&- 9>&- &
record prometheus $! prometheus
for _ in $(seq 1 100); do curl -fsS "http://127.0.0.1:$PROM_PORT/-/ready" >/dev/null 2>&1 && break; sleep 0.1; done
echo "REGISTRY_URL=$REG PROMETHEUS_URL=http://127.0.0.1:$PROM_PORT"
