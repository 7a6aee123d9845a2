/*-------------------------------------------------------------------------
 *
 * shmem.h
 *		Shared-memory registry and the partitioned keyed table that the
 *		shared-memory capabilities (rate limits, breakers, bulkheads) use.
 *
 *-------------------------------------------------------------------------
 */
#ifndef RESILIENCE_SHMEM_H
#define RESILIENCE_SHMEM_H

#include "resilience.h"

#include <stdio.h>

#include "port/atomics.h"
#include "storage/lwlock.h"
#include "storage/spin.h"

#define SHM_NIL PG_UINT32_MAX

/*
 * Header of every table entry.  The owner's payload follows it, then the key
 * bytes (not NUL-terminated).  hash, next, keylen and kind change only under
 * the partition lock held exclusively; the payload and last_used/referenced
 * under the entry's spinlock while the partition lock is held in any mode.
 */
typedef struct ShmEntry
{
	uint32		hash;
	uint32		next;			/* next entry in the bucket chain, or SHM_NIL */
	uint16		keylen;
	uint8		kind;			/* owner-defined namespace within the table */
	bool		referenced;		/* CLOCK bit: used since the last sweep */
	slock_t		mutex;
	int64		last_used;		/* resilience_clock_ns() of the last use */
} ShmEntry;

typedef struct ShmTable ShmTable;

/*
 * The owner's eviction rule: is this entry's state worth nothing (the state
 * a fresh entry would have now, so dropping it loses no information)?  Only
 * such entries are evicted or swept.  Called with the partition lock held
 * exclusively and the entry's spinlock held: no errors, no allocation, a
 * small bounded amount of work.
 */
typedef bool (*ShmIdleFn) (ShmEntry *entry, void *payload, int64 now);

/* Counters a table keeps about itself (read without locks). */
typedef struct ShmTableStats
{
	uint32		max_entries;
	uint32		used;
	uint64		evicted_idle;
	uint64		evicted_active;
	uint64		full;			/* inserts that found no room */
} ShmTableStats;

extern Size shm_table_size(uint32 max_entries, Size payload_size, int max_key_len);
extern ShmTable *shm_table_init(const char *name, uint32 max_entries,
								Size payload_size, int max_key_len,
								const char *tranche, int npartitions);
extern void shm_table_request_locks(const char *tranche, int npartitions);

extern uint32 shm_table_hash(uint8 kind, const char *key, int keylen);
extern LWLock *shm_table_lock(ShmTable *table, uint32 hash);
extern ShmEntry *shm_table_find(ShmTable *table, uint32 hash, uint8 kind,
								const char *key, int keylen);
extern ShmEntry *shm_table_enter(ShmTable *table, uint32 hash, uint8 kind,
								 const char *key, int keylen, bool evict,
								 ShmIdleFn idle, bool *found);
extern bool shm_table_remove(ShmTable *table, uint32 hash, uint8 kind,
							 const char *key, int keylen);
extern int	shm_table_sweep(ShmTable *table, ShmIdleFn idle);

typedef void (*ShmVisitFn) (ShmEntry *entry, void *payload, const char *key,
							void *arg);
extern void shm_table_visit(ShmTable *table, ShmVisitFn visit, void *arg);
extern void shm_table_stats(ShmTable *table, ShmTableStats *stats);

extern void *shm_entry_payload(ShmTable *table, ShmEntry *entry);
extern char *shm_entry_key(ShmTable *table, ShmEntry *entry);

/* Registry: hooks chained from _PG_init. */
extern void resilience_shmem_hooks(void);

/* State kept across a clean restart: one section per capability. */
#define STATE_SECTION_END 0
#define STATE_SECTION_RATELIMIT 1
#define STATE_SECTION_BREAKER 2
extern void state_write_section(FILE *file, uint32 section, uint32 nrecords);

/*
 * What a table's save callback (a ShmVisitFn) gets: it counts every entry,
 * and writes it too once file is set.
 */
typedef struct StateSaveContext
{
	FILE	   *file;			/* NULL while counting */
	int64		now;
	uint32		count;
	bool		ok;
} StateSaveContext;
extern bool state_save_table(FILE *file, uint32 section, ShmTable *table,
							 ShmVisitFn save);
extern bool state_write(FILE *file, const void *data, Size len);
extern bool state_read(FILE *file, void *data, Size len);

/* ratelimit.c */
extern Size ratelimit_shmem_size(void);
extern void ratelimit_shmem_request(void);
extern void ratelimit_shmem_init(void);
extern bool ratelimit_state_save(FILE *file);
extern bool ratelimit_state_load(FILE *file, uint32 nrecords);
extern bool ratelimit_table_stats(ShmTableStats *stats);

/* locks.c */
extern Size locks_shmem_size(void);
extern void locks_shmem_request(void);
extern void locks_shmem_init(void);
/* breaker.c */
extern Size breaker_shmem_size(void);
extern void breaker_shmem_request(void);
extern void breaker_shmem_init(void);
extern bool breaker_state_save(FILE *file);
extern bool breaker_state_load(FILE *file, uint32 nrecords);

/* bulkhead.c */
extern Size bulkhead_shmem_size(void);
extern void bulkhead_shmem_request(void);
extern void bulkhead_shmem_init(void);

/* relay.c */
extern Size relay_shmem_size(void);
extern void relay_shmem_request(void);
extern void relay_shmem_init(void);

/* quota.c */
extern Size quota_shmem_size(void);
extern void quota_shmem_request(void);
extern void quota_shmem_init(void);
extern void quota_define_settings(void);

/* metrics.c */
extern Size metrics_shmem_size(void);
extern void metrics_shmem_request(void);
extern void metrics_shmem_init(void);

/* worker.c */
extern Size worker_shmem_size(void);
extern void worker_shmem_request(void);
extern void worker_shmem_init(void);

#endif							/* RESILIENCE_SHMEM_H */
