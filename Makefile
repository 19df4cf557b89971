# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv when it is missing.
PY := .venv/bin/python
PIP := .venv/bin/pip

.PHONY: venv demo test clean llama-cpp
venv: .venv/.installed

# torch first (pinned; here pip takes the CPU wheel on disk), then deepspeed without build isolation and
# without compiled ops (its setup.py imports torch; in an isolated build pip would fetch a CUDA torch),
# then the project itself, editable, with the test extras.
.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation deepspeed==0.19.8
	$(PIP) install -q -e '.[dev]'
	touch $@

# llama.cpp's Python binding, built from its PyPI source package with the system cmake and compiler (about 7
# minutes on 2 cores). An extra: the GGUF tests run the exported files in it, and skip without it outside CI;
# .ci/run installs it before the tests.
llama-cpp: venv
	$(PY) -c 'import llama_cpp' 2>/dev/null || CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) install -q llama-cpp-python==0.3.36

demo: venv
	$(PY) stages/pretrain.py

test: venv
	$(PY) -m pytest -q --durations=25 tests

clean:
	rm -rf .venv runs out
