# Sourced by bench/run.sh: the events section of `make bench` (issues 8, 20):
# append_events of one event to a new stream (-1) and to one of 1,000
# existing streams (NULL), against a plain INSERT of the same event row into
# a copy of resilience.stream_events, each in a transaction of its own.
# Taken in turns with the other sections' runs, BENCH_ROUNDS times.
# Alone: BENCH_SECTIONS=events make bench (or bash bench/run.sh with it).

run_events() {
	run_pgbench events_insert "plain INSERT of the same event row, in a transaction" events_insert.sql
	run_pgbench events_append_new "append_events, one event, new stream (-1)" events_append_new.sql
	run_pgbench events_append_existing "append_events, one event, 1000 streams (NULL)" events_append_existing.sql
}

report_events() {
	ratio_line "append_events (new stream) / plain INSERT" events_append_new events_insert ">=" 0.8
	ratio_line "append_events (existing stream) / plain INSERT" events_append_existing events_insert ">=" 0.8
}
