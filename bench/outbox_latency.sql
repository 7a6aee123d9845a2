SELECT resilience.outbox_publish('bench.lat', jsonb_build_object('t', (extract(epoch FROM clock_timestamp()) * 1000)::text));
