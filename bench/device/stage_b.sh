cp .assets/smollm2_kv.npz /tmp/oscar_keep/ && ls -la /tmp/oscar_keep
