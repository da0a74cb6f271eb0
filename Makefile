# The two commands a newcomer needs: `make demo` (a real split-learning run, no broker) and
# `make test` (everything installed, RabbitMQ started if needed, the chart checked, the images
# built, the whole suite: unit, broker, chart, image and local cluster tests).
PY := .venv/bin/python
SPLITFED := .venv/bin/splitfed

.PHONY: demo test bench setup setup-test

setup:
	ci/setup.sh run

setup-test:
	ci/setup.sh test

demo: setup
	mkdir -p results
	$(SPLITFED) run split --dataset fashion-mnist --epochs 1 --out results/split.json

test: setup-test
	ci/broker.sh
	ci/chart.sh
	ci/images.sh
	$(PY) -m pytest -q --durations=25 -n 2 --dist loadfile tests

bench: setup-test
	ci/broker.sh
	$(PY) ci/bench_split.py
	$(PY) ci/bench_splitnn.py --repeat 3
	$(PY) ci/bench_fedavg.py overhead
	$(PY) ci/bench_fedavg.py scale
