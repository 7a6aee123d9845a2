SELECT resilience.advisory_xact_lock('hot');
