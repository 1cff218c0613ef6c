# The two entry points of the README. Everything else is cargo or tests/harness/*.sh.
SHELL := /bin/bash
.PHONY: demo test deps tools down

# The main job: a local cluster with simulated nodes, the operator and the samples.
demo: deps
	tests/harness/demo.sh

# Every test (unit, UI, end-to-end on the local control plane). Installs what a fresh machine lacks.
test: deps tools
	tests/harness/test.sh

deps:
	tests/harness/deps.sh

tools:
	framework/tools/tools.sh ensure

down:
	KUBE_PLAN_CLUSTER_STATE=$(CURDIR)/target/demo-cluster cargo run -q -p e2e --bin cluster -- down
	cargo run -q -p e2e --bin cluster -- down
