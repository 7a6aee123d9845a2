# The quota section of `make bench` (issue 19), sourced by bench/run.sh.
#
# resilience.quota on 100,000 random existing keys and on one hot key, 8
# clients, synchronous_commit on, against SELECT 1 and the PL/pgSQL token
# bucket over a logged table (bench/setup.sql), all measured in the same run.
# Every call is admitted.  With logging ahead (resilience.quota_log_ahead,
# default 32) one call in 33 per key writes a WAL record and flushes it; the
# others change the page in place.  The same two runs with
# quota_log_ahead = 0 (every call logged and flushed, like the table
# bucket) give the gain side by side.
#
# Alone: `bash bench/quota.sh` (same environment as run.sh) runs run.sh with
# BENCH_SECTIONS=quota: the setup, SELECT 1 and this section only.

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
	BENCH_SECTIONS=quota exec bash "$(dirname "$0")/run.sh"
fi

quota_log_ahead() {
	psql -X -q -c "ALTER SYSTEM SET resilience.quota_log_ahead = $1" -c "SELECT pg_reload_conf()" >/dev/null
}

run_quota() {
	run_pgbench quota_random "quota, random keys (100,000)" quota_random.sql
	run_pgbench quota_hot "quota, hot key" quota_hot.sql
	quota_log_ahead 0
	run_pgbench quota_random_every "quota, random keys, quota_log_ahead = 0" quota_random.sql
	run_pgbench quota_hot_every "quota, hot key, quota_log_ahead = 0" quota_hot.sql
	quota_log_ahead DEFAULT
	run_pgbench quota_logged_random "PL/pgSQL bucket, logged table, random keys" bucket_logged_random.sql
	run_pgbench quota_logged_hot "PL/pgSQL bucket, logged table, hot key" bucket_logged_hot.sql
	run_pgbench quota_xid "SELECT txid_current() (an xid, a flushed commit)" quota_xid.sql
}

report_quota() {
	# Fair by construction: every run of this section uses the same cluster,
	# so both sides have the same synchronous_commit and fsync (stated).
	say "  quota (synchronous_commit=$(psql -X -Atc 'SHOW synchronous_commit')," \
		"fsync=$(psql -X -Atc 'SHOW fsync') for quota and the bucket alike; every call is admitted):"
	ratio_line "quota random / SELECT 1" quota_random select1 ">=" 0.6
	ratio_line "quota random / logged-table bucket random" quota_random quota_logged_random ">=" 2
	ratio_line "quota hot / SELECT 1" quota_hot select1
	ratio_line "quota hot / logged-table bucket hot" quota_hot quota_logged_hot
	say "  logging ahead against logging every decision (quota_log_ahead = 0):"
	ratio_line "quota random / quota random, ahead 0" quota_random quota_random_every
	ratio_line "quota hot / quota hot, ahead 0" quota_hot quota_hot_every
	ratio_line "quota random, ahead 0 / logged-table bucket random" quota_random_every quota_logged_random
	say "  for context (txid_current: a transaction with an xid and a flushed commit, the cost of nextval-style durability):"
	ratio_line "txid_current() / SELECT 1" quota_xid select1
	ratio_line "quota random / txid_current()" quota_random quota_xid
}
