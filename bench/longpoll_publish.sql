-- make bench, webhooks section: one event for the long-poll consumer, with
-- its publish time (epoch ms) for commit-to-claim latency.
SELECT resilience.outbox_publish('bench.lp.e', jsonb_build_object('t', (extract(epoch FROM clock_timestamp()) * 1000)::text));
