# Shortcuts for dev.py, which needs nothing but Python 3.11+.
.PHONY: run test lint ci bench

run:
	python3 dev.py run

test:
	python3 dev.py test

lint:
	python3 dev.py lint

ci:
	bash .ci/run

bench:
	scripts/bench.sh uvicorn
