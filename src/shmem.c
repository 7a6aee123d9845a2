/*-------------------------------------------------------------------------
 *
 * shmem.c
 *		Shared-memory registry: sizing, startup, the state file kept across
 *		clean restarts, and the partitioned keyed table.
 *
 * The keyed table
 * ---------------
 * A fixed array of max_entries entries, chained hash buckets and a free list,
 * all allocated once at startup (nothing grows).  Buckets are spread over
 * npartitions LWLocks (bucket b belongs to partition b % npartitions).
 *
 * Locking rules:
 *	- Reading or updating an entry's state: its partition lock in shared
 *	  mode, then the entry's spinlock for the few instructions of the update.
 *	- Linking or unlinking an entry (insert, remove, evict): its partition
 *	  lock in exclusive mode.  Nobody holds two partition locks at once;
 *	  eviction releases its own partition before touching another one.
 *	- The free list has its own spinlock, taken with or without a partition
 *	  lock but never while holding an entry spinlock.
 *	- Nothing that can error, allocate or wait happens under a spinlock.
 *
 * Eviction
 * --------
 * Only the owner of an entry type knows whether dropping an entry loses
 * anything, so the owner passes a callback (ShmIdleFn) to shm_table_enter
 * and shm_table_sweep, the same one to both: "is this entry's state the
 * state a fresh entry would have now?" (a full token bucket, an empty
 * window, a bulkhead nobody holds, a closed breaker with an empty window).
 * It runs with the partition lock held exclusively and the entry's
 * spinlock held, so it must not error, allocate or call out, and it must
 * take a bounded, small time (O(1), or O(its fixed-size state)).  A
 * function pointer is passed per call rather than stored in the table:
 * shared memory holds no per-process pointers.
 *
 * An entry the callback refuses is never evicted and never swept: an end
 * user who controls key material cannot push a depleted limiter out of the
 * table by creating new keys.  When the free list is empty and the caller
 * allows eviction, a CLOCK sweep (PostgreSQL's buffer replacement
 * approximation of LRU) takes the first evictable entry not used since the
 * hand last passed.  If it finds none within SWEEP_LIMIT entries, it takes
 * the least recently used evictable entry it saw (one used lately, counted
 * as evicted_active); if it saw none, the insert finds no room (full) and
 * the owner applies its fallback.
 *
 * The cost stays bounded: one sweep looks at no more than SWEEP_LIMIT
 * entries (or twice the table, if smaller), never waits for a partition lock
 * (busy ones are skipped), and is repeated (at most twice) only when it
 * skipped busy entries or lost its candidate to a concurrent change.  A
 * sweep claims its SWEEP_LIMIT positions of the hand with one atomic add,
 * so concurrent sweeps look at different entries.  A sweep of 1024 entries
 * of a 100,000-key table takes about 0.5 ms (cache misses dominate).  After
 * sweeps that found nothing to evict, inserts into that table do not sweep
 * again for EVICT_BACKOFF_NS (10 ms): a flood of new keys into a table full
 * of entries worth keeping costs at most one sweep per 10 ms (about 5% of
 * one CPU), not one per call.  Freed entries (the free list) are used at
 * once all the same.
 *
 * The state file
 * --------------
 * At a clean shutdown the postmaster writes pg_stat/resilience.state (magic,
 * PostgreSQL major version, format version, then one section per capability)
 * through a .tmp file and durable_rename.  At startup it is read and
 * unlinked, so after a crash or an immediate shutdown (no write at exit)
 * state starts afresh.  A file
 * that is missing, from another version or damaged is logged and ignored:
 * startup never fails over it.
 *
 *-------------------------------------------------------------------------
 */
#include "shmem.h"

#include <unistd.h>

#include "catalog/pg_control.h"
#include "common/controldata_utils.h"
#include "common/hashfn.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/fd.h"
#include "storage/ipc.h"
#include "storage/shmem.h"

#define SWEEP_LIMIT 1024
/* After sweeps that found nothing to evict, do not sweep for this long. */
#define EVICT_BACKOFF_NS INT64CONST(10000000)

#define STATE_FILE	PGSTAT_STAT_PERMANENT_DIRECTORY "/resilience.state"
#define STATE_MAGIC 0x52534C31	/* "RSL1" */
#define STATE_FORMAT 1

struct ShmTable
{
	char		name[NAMEDATALEN];
	uint32		max_entries;
	uint32		nbuckets;		/* a power of two */
	uint32		npartitions;	/* a power of two, <= nbuckets */
	Size		payload_offset;
	Size		key_offset;
	Size		entry_size;
	Size		entries_offset;
	int			max_key_len;
	LWLockPadded *locks;		/* the named tranche, in the main LWLock array */
	slock_t		freelist_mutex;
	uint32		freelist;
	uint32		used;
	pg_atomic_uint32 clock_hand;
	pg_atomic_uint64 evicted_idle;
	pg_atomic_uint64 evicted_active;
	pg_atomic_uint64 full;
	pg_atomic_uint64 no_sweep_until;	/* clock reading; see EVICT_BACKOFF_NS */
	uint32		buckets[FLEXIBLE_ARRAY_MEMBER];
};

#if PG_VERSION_NUM >= 150000
static shmem_request_hook_type prev_shmem_request_hook = NULL;
#endif
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

static void state_load(void);
static void state_save(int code, Datum arg);

/* Smallest power of two >= n (n >= 1). */
static uint32
next_pow2(uint32 n)
{
	uint32		p = 1;

	while (p < n)
		p <<= 1;
	return p;
}

static inline ShmEntry *
entry_at(ShmTable *table, uint32 idx)
{
	return (ShmEntry *) ((char *) table + table->entries_offset +
						 (Size) idx * table->entry_size);
}

static inline uint32
entry_index(ShmTable *table, ShmEntry *entry)
{
	return (uint32) (((char *) entry - ((char *) table + table->entries_offset)) /
					 table->entry_size);
}

void *
shm_entry_payload(ShmTable *table, ShmEntry *entry)
{
	return (char *) entry + table->payload_offset;
}

char *
shm_entry_key(ShmTable *table, ShmEntry *entry)
{
	return (char *) entry + table->key_offset;
}

/* Layout arithmetic shared by shm_table_size and shm_table_init. */
static void
table_layout(uint32 max_entries, Size payload_size, int max_key_len,
			 int npartitions, uint32 *nbuckets, Size *entry_size,
			 Size *entries_offset)
{
	*nbuckets = Max(next_pow2(max_entries), next_pow2(npartitions));
	*entry_size = MAXALIGN(sizeof(ShmEntry)) + MAXALIGN(payload_size) +
		MAXALIGN(max_key_len);
	*entries_offset = MAXALIGN(add_size(offsetof(ShmTable, buckets),
										mul_size(*nbuckets, sizeof(uint32))));
}

Size
shm_table_size(uint32 max_entries, Size payload_size, int max_key_len)
{
	uint32		nbuckets;
	Size		entry_size;
	Size		entries_offset;

	/* npartitions only raises nbuckets for tiny tables; 128 covers it */
	table_layout(max_entries, payload_size, max_key_len, 128,
				 &nbuckets, &entry_size, &entries_offset);
	return add_size(entries_offset, mul_size(max_entries, entry_size));
}

void
shm_table_request_locks(const char *tranche, int npartitions)
{
	RequestNamedLWLockTranche(tranche, npartitions);
}

/* Create or attach to a table; call with AddinShmemInitLock held. */
ShmTable *
shm_table_init(const char *name, uint32 max_entries, Size payload_size,
			   int max_key_len, const char *tranche, int npartitions)
{
	ShmTable   *table;
	bool		found;
	uint32		i;

	Assert(npartitions <= 128 && (npartitions & (npartitions - 1)) == 0);
	table = ShmemInitStruct(name,
							shm_table_size(max_entries, payload_size, max_key_len),
							&found);
	if (found)
		return table;

	strlcpy(table->name, name, NAMEDATALEN);
	table->max_entries = max_entries;
	table->npartitions = npartitions;
	table_layout(max_entries, payload_size, max_key_len, npartitions,
				 &table->nbuckets, &table->entry_size, &table->entries_offset);
	table->payload_offset = MAXALIGN(sizeof(ShmEntry));
	table->key_offset = table->payload_offset + MAXALIGN(payload_size);
	table->max_key_len = max_key_len;
	table->locks = GetNamedLWLockTranche(tranche);
	SpinLockInit(&table->freelist_mutex);
	pg_atomic_init_u32(&table->clock_hand, 0);
	pg_atomic_init_u64(&table->evicted_idle, 0);
	pg_atomic_init_u64(&table->evicted_active, 0);
	pg_atomic_init_u64(&table->full, 0);
	pg_atomic_init_u64(&table->no_sweep_until, 0);
	for (i = 0; i < table->nbuckets; i++)
		table->buckets[i] = SHM_NIL;
	for (i = 0; i < max_entries; i++)
	{
		ShmEntry   *entry = entry_at(table, i);

		memset(entry, 0, table->entry_size);
		SpinLockInit(&entry->mutex);
		entry->next = (i + 1 < max_entries) ? i + 1 : SHM_NIL;
	}
	table->freelist = max_entries > 0 ? 0 : SHM_NIL;
	table->used = 0;
	return table;
}

uint32
shm_table_hash(uint8 kind, const char *key, int keylen)
{
	return hash_combine((uint32) kind,
						hash_bytes((const unsigned char *) key, keylen));
}

LWLock *
shm_table_lock(ShmTable *table, uint32 hash)
{
	return &table->locks[hash & (table->npartitions - 1)].lock;
}

static inline uint32 *
bucket_for(ShmTable *table, uint32 hash)
{
	return &table->buckets[hash & (table->nbuckets - 1)];
}

/* Look an entry up; the caller holds its partition lock in any mode. */
ShmEntry *
shm_table_find(ShmTable *table, uint32 hash, uint8 kind, const char *key,
			   int keylen)
{
	uint32		idx = *bucket_for(table, hash);

	while (idx != SHM_NIL)
	{
		ShmEntry   *entry = entry_at(table, idx);

		if (entry->hash == hash && entry->kind == kind &&
			entry->keylen == keylen &&
			memcmp(shm_entry_key(table, entry), key, keylen) == 0)
			return entry;
		idx = entry->next;
	}
	return NULL;
}

static uint32
freelist_pop(ShmTable *table)
{
	uint32		idx;

	SpinLockAcquire(&table->freelist_mutex);
	idx = table->freelist;
	if (idx != SHM_NIL)
	{
		table->freelist = entry_at(table, idx)->next;
		table->used++;
	}
	SpinLockRelease(&table->freelist_mutex);
	return idx;
}

static void
freelist_push(ShmTable *table, uint32 idx)
{
	ShmEntry   *entry = entry_at(table, idx);

	SpinLockAcquire(&table->freelist_mutex);
	entry->next = table->freelist;
	table->freelist = idx;
	table->used--;
	SpinLockRelease(&table->freelist_mutex);
}

/*
 * Unlink entry idx from its chain; the caller holds its partition exclusively.
 * Returns false if it is not linked there (free, or moved since it was seen).
 */
static bool
unlink_entry(ShmTable *table, uint32 idx, uint32 hash)
{
	uint32	   *link = bucket_for(table, hash);

	while (*link != SHM_NIL)
	{
		if (*link == idx)
		{
			*link = entry_at(table, idx)->next;
			return true;
		}
		link = &entry_at(table, *link)->next;
	}
	return false;
}

static bool
is_linked(ShmTable *table, uint32 idx, uint32 hash)
{
	uint32		cur = *bucket_for(table, hash);

	for (; cur != SHM_NIL; cur = entry_at(table, cur)->next)
		if (cur == idx)
			return true;
	return false;
}

/* Ask the owner, under the entry's spinlock, whether entry may be evicted. */
static inline bool
entry_evictable(ShmTable *table, ShmEntry *entry, ShmIdleFn evictable,
				int64 now)
{
	bool		result;

	SpinLockAcquire(&entry->mutex);
	result = evictable(entry, shm_entry_payload(table, entry), now);
	SpinLockRelease(&entry->mutex);
	return result;
}

/*
 * Take one evictable entry out of use by a CLOCK sweep (see the file header)
 * and return its index, unlinked and counted as used; SHM_NIL if none could
 * be taken, with *retry set when another sweep might succeed (an entry was
 * skipped because its partition was busy, or the candidate changed).
 * Holds at most one partition lock at a time, never waiting for a busy one
 * during the sweep.
 */
static uint32
evict_one(ShmTable *table, ShmIdleFn evictable, bool *retry)
{
	int64		now = resilience_clock_ns();
	uint32		oldest = SHM_NIL;
	uint32		oldest_hash = 0;
	int64		oldest_used = PG_INT64_MAX;
	uint32		limit = Min((uint32) SWEEP_LIMIT, table->max_entries * 2);
	uint32		start;
	uint32		i;

	/* claim the hand's next `limit` positions at once: one atomic, not many */
	start = pg_atomic_fetch_add_u32(&table->clock_hand, limit);
	for (i = 0; i < limit; i++)
	{
		uint32		idx = (uint32) (((uint64) start + i) % table->max_entries);
		ShmEntry   *entry = entry_at(table, idx);
		uint32		hash = entry->hash; /* unlocked read, verified below */
		LWLock	   *lock = shm_table_lock(table, hash);
		bool		taken = false;

		if (!LWLockConditionalAcquire(lock, LW_EXCLUSIVE))
		{
			*retry = true;
			continue;
		}
		if (entry->hash == hash && is_linked(table, idx, hash))
		{
			if (entry_evictable(table, entry, evictable, now))
			{
				if (!entry->referenced)
					taken = unlink_entry(table, idx, hash);
				else if (entry->last_used < oldest_used)
				{
					oldest = idx;
					oldest_hash = hash;
					oldest_used = entry->last_used;
				}
			}
			entry->referenced = false;
		}
		LWLockRelease(lock);
		if (taken)
		{
			pg_atomic_fetch_add_u64(&table->evicted_idle, 1);
			return idx;
		}
	}

	/* every evictable entry seen was used lately: take the oldest of them */
	if (oldest != SHM_NIL)
	{
		LWLock	   *lock = shm_table_lock(table, oldest_hash);
		ShmEntry   *entry = entry_at(table, oldest);
		bool		taken = false;

		LWLockAcquire(lock, LW_EXCLUSIVE);
		if (entry->hash == oldest_hash && is_linked(table, oldest, oldest_hash) &&
			entry_evictable(table, entry, evictable, resilience_clock_ns()))
			taken = unlink_entry(table, oldest, oldest_hash);
		LWLockRelease(lock);
		if (taken)
		{
			pg_atomic_fetch_add_u64(&table->evicted_active, 1);
			return oldest;
		}
		*retry = true;
	}
	return SHM_NIL;
}

/*
 * Evict an entry for a new one, unless a recent sweep found nothing to evict
 * (see EVICT_BACKOFF_NS); SHM_NIL when there is none.
 */
static uint32
evict_for_insert(ShmTable *table, ShmIdleFn evictable)
{
	uint32		idx = SHM_NIL;
	int64		now = resilience_clock_ns();
	bool		retry = true;
	int			attempt;

	if (now < (int64) pg_atomic_read_u64(&table->no_sweep_until))
		return SHM_NIL;
	for (attempt = 0; idx == SHM_NIL && retry && attempt < 3; attempt++)
	{
		retry = false;
		idx = evict_one(table, evictable, &retry);
	}
	if (idx == SHM_NIL)
		pg_atomic_write_u64(&table->no_sweep_until,
							(uint64) (resilience_clock_ns() + EVICT_BACKOFF_NS));
	return idx;
}

/*
 * Find or create the entry for a key.  Returns with the entry's partition lock
 * held exclusively (release it with LWLockRelease(shm_table_lock(...))), or
 * NULL without any lock when the table is full and nothing could be evicted:
 * with evict, only entries that idle (the owner's callback) calls
 * evictable are candidates.  A new entry has a zeroed payload; *found tells
 * which case it is.
 */
ShmEntry *
shm_table_enter(ShmTable *table, uint32 hash, uint8 kind, const char *key,
				int keylen, bool evict, ShmIdleFn idle, bool *found)
{
	LWLock	   *lock = shm_table_lock(table, hash);
	ShmEntry   *entry;
	uint32		idx;
	uint32	   *bucket;

	Assert(keylen <= table->max_key_len);
	Assert(!evict || idle != NULL);
	LWLockAcquire(lock, LW_EXCLUSIVE);
	entry = shm_table_find(table, hash, kind, key, keylen);
	if (entry)
	{
		*found = true;
		return entry;
	}

	idx = freelist_pop(table);
	if (idx == SHM_NIL)
	{
		LWLockRelease(lock);
		if (evict)
			idx = evict_for_insert(table, idle);
		if (idx == SHM_NIL)
		{
			pg_atomic_fetch_add_u64(&table->full, 1);
			return NULL;
		}
		LWLockAcquire(lock, LW_EXCLUSIVE);
		entry = shm_table_find(table, hash, kind, key, keylen);
		if (entry)
		{
			/* someone else created it meanwhile; give the evicted slot back */
			freelist_push(table, idx);
			*found = true;
			return entry;
		}
	}

	entry = entry_at(table, idx);
	memset((char *) entry + table->payload_offset, 0,
		   table->key_offset - table->payload_offset);
	memcpy(shm_entry_key(table, entry), key, keylen);
	entry->hash = hash;
	entry->kind = kind;
	entry->keylen = keylen;
	entry->referenced = true;
	entry->last_used = resilience_clock_ns();
	bucket = bucket_for(table, hash);
	entry->next = *bucket;
	*bucket = idx;
	*found = false;
	return entry;
}

/* Remove a key; returns whether it was there. */
bool
shm_table_remove(ShmTable *table, uint32 hash, uint8 kind, const char *key,
				 int keylen)
{
	LWLock	   *lock = shm_table_lock(table, hash);
	ShmEntry   *entry;
	bool		removed = false;

	LWLockAcquire(lock, LW_EXCLUSIVE);
	entry = shm_table_find(table, hash, kind, key, keylen);
	if (entry)
	{
		uint32		idx = entry_index(table, entry);

		removed = unlink_entry(table, idx, hash);
		if (removed)
			freelist_push(table, idx);
	}
	LWLockRelease(lock);
	return removed;
}

/*
 * Remove every idle entry not used since the previous sweep, one partition at
 * a time; returns how many were removed.  The job behind run_reaper().
 */
int
shm_table_sweep(ShmTable *table, ShmIdleFn idle)
{
	int			removed = 0;
	uint32		p;

	for (p = 0; p < table->npartitions; p++)
	{
		int64		now = resilience_clock_ns();
		uint32		b;

		CHECK_FOR_INTERRUPTS();
		LWLockAcquire(&table->locks[p].lock, LW_EXCLUSIVE);
		for (b = p; b < table->nbuckets; b += table->npartitions)
		{
			uint32	   *link = &table->buckets[b];

			while (*link != SHM_NIL)
			{
				uint32		idx = *link;
				ShmEntry   *entry = entry_at(table, idx);

				if (!entry->referenced &&
					entry_evictable(table, entry, idle, now))
				{
					*link = entry->next;
					freelist_push(table, idx);
					removed++;
					continue;
				}
				entry->referenced = false;
				link = &entry->next;
			}
		}
		LWLockRelease(&table->locks[p].lock);
	}
	return removed;
}

/*
 * Call visit for every entry, holding its partition lock in shared mode (the
 * callback takes the entry's spinlock itself if it reads mutable state).
 */
void
shm_table_visit(ShmTable *table, ShmVisitFn visit, void *arg)
{
	uint32		p;

	for (p = 0; p < table->npartitions; p++)
	{
		uint32		b;

		CHECK_FOR_INTERRUPTS();
		LWLockAcquire(&table->locks[p].lock, LW_SHARED);
		for (b = p; b < table->nbuckets; b += table->npartitions)
		{
			uint32		idx;

			for (idx = table->buckets[b]; idx != SHM_NIL; idx = entry_at(table, idx)->next)
			{
				ShmEntry   *entry = entry_at(table, idx);

				visit(entry, shm_entry_payload(table, entry),
					  shm_entry_key(table, entry), arg);
			}
		}
		LWLockRelease(&table->locks[p].lock);
	}
}

void
shm_table_stats(ShmTable *table, ShmTableStats *stats)
{
	stats->max_entries = table->max_entries;
	SpinLockAcquire(&table->freelist_mutex);
	stats->used = table->used;
	SpinLockRelease(&table->freelist_mutex);
	stats->evicted_idle = pg_atomic_read_u64(&table->evicted_idle);
	stats->evicted_active = pg_atomic_read_u64(&table->evicted_active);
	stats->full = pg_atomic_read_u64(&table->full);
}

/*
 * Shared-memory-only functions call this first: without preloading there is
 * nothing to use, and the hint says what to set.
 */
void
resilience_require_preload(const char *feature)
{
	if (!resilience_preloaded)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("%s requires resilience to be loaded via shared_preload_libraries",
						feature),
				 errdetail("Its state lives in shared memory, which is set up only at server start."),
				 errhint("Add 'resilience' to shared_preload_libraries in postgresql.conf and restart the server.")));
}

/* ---- registry: request and startup hooks ---- */

static void
resilience_shmem_request(void)
{
#if PG_VERSION_NUM >= 150000
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
#endif
	RequestAddinShmemSpace(ratelimit_shmem_size());
	RequestAddinShmemSpace(worker_shmem_size());
	RequestAddinShmemSpace(locks_shmem_size());
	RequestAddinShmemSpace(breaker_shmem_size());
	RequestAddinShmemSpace(bulkhead_shmem_size());
	RequestAddinShmemSpace(relay_shmem_size());
	RequestAddinShmemSpace(metrics_shmem_size());
	RequestAddinShmemSpace(quota_shmem_size());
	ratelimit_shmem_request();
	worker_shmem_request();
	locks_shmem_request();
	breaker_shmem_request();
	bulkhead_shmem_request();
	relay_shmem_request();
	metrics_shmem_request();
	quota_shmem_request();
}

static void
resilience_shmem_startup(void)
{
	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	ratelimit_shmem_init();
	worker_shmem_init();
	locks_shmem_init();
	breaker_shmem_init();
	bulkhead_shmem_init();
	relay_shmem_init();
	metrics_shmem_init();
	quota_shmem_init();
	LWLockRelease(AddinShmemInitLock);

	/* The postmaster (or a standalone backend) owns the state file. */
	if (!IsUnderPostmaster)
	{
		state_load();
		on_shmem_exit(state_save, (Datum) 0);
	}
}

void
resilience_shmem_hooks(void)
{
#if PG_VERSION_NUM >= 150000
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = resilience_shmem_request;
#else
	resilience_shmem_request();
#endif
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = resilience_shmem_startup;
}

/* ---- the state file ---- */

bool
state_write(FILE *file, const void *data, Size len)
{
	return fwrite(data, 1, len, file) == len;
}

bool
state_read(FILE *file, void *data, Size len)
{
	return fread(data, 1, len, file) == len;
}

void
state_write_section(FILE *file, uint32 section, uint32 nrecords)
{
	uint32		header[2] = {section, nrecords};

	state_write(file, header, sizeof(header));
}

/* Write a table as one section: a pass to count its entries, one to write them. */
bool
state_save_table(FILE *file, uint32 section, ShmTable *table, ShmVisitFn save)
{
	StateSaveContext ctx = {NULL, resilience_clock_ns(), 0, true};

	if (table == NULL)
		return true;
	shm_table_visit(table, save, &ctx);
	state_write_section(file, section, ctx.count);
	ctx.file = file;
	ctx.count = 0;
	shm_table_visit(table, save, &ctx);
	return ctx.ok;
}

/*
 * Did the server just shut down cleanly?  An immediate shutdown also ends the
 * postmaster with exit code 0, but leaves the control file "in production";
 * its shared memory may then hold locks of killed backends, so it must not
 * be read.
 */
static bool
shut_down_cleanly(void)
{
	bool		crc_ok;
	ControlFileData *control = get_controlfile(DataDir, &crc_ok);

	return crc_ok && (control->state == DB_SHUTDOWNED ||
					  control->state == DB_SHUTDOWNED_IN_RECOVERY);
}

/* Write the state at a clean shutdown (never after a crash). */
static void
state_save(int code, Datum arg)
{
	FILE	   *file;
	uint32		header[3] = {STATE_MAGIC, PG_VERSION_NUM / 100, STATE_FORMAT};
	bool		ok;

	if (code != 0 || !shut_down_cleanly())
		return;

	file = AllocateFile(STATE_FILE ".tmp", PG_BINARY_W);
	if (file == NULL)
	{
		ereport(LOG,
				(errcode_for_file_access(),
				 errmsg("could not write resilience state file \"%s\": %m",
						STATE_FILE ".tmp")));
		return;
	}
	ok = state_write(file, header, sizeof(header));
	ok = ok && ratelimit_state_save(file);
	ok = ok && breaker_state_save(file);
	if (ok)
		state_write_section(file, STATE_SECTION_END, 0);
	ok = ok && !ferror(file);
	if (FreeFile(file) != 0)
		ok = false;
	if (!ok)
	{
		ereport(LOG,
				(errcode_for_file_access(),
				 errmsg("could not write resilience state file \"%s\": %m",
						STATE_FILE ".tmp")));
		unlink(STATE_FILE ".tmp");
		return;
	}
	(void) durable_rename(STATE_FILE ".tmp", STATE_FILE, LOG);
}

/* Read the state written at the last clean shutdown, then remove the file. */
static void
state_load(void)
{
	FILE	   *file;
	uint32		header[3];
	bool		ok = true;

	file = AllocateFile(STATE_FILE, PG_BINARY_R);
	if (file == NULL)
	{
		if (errno != ENOENT)
			ereport(LOG,
					(errcode_for_file_access(),
					 errmsg("could not read resilience state file \"%s\": %m",
							STATE_FILE)));
		return;
	}

	if (!state_read(file, header, sizeof(header)) ||
		header[0] != STATE_MAGIC ||
		header[1] != PG_VERSION_NUM / 100 ||
		header[2] != STATE_FORMAT)
	{
		ereport(LOG,
				(errmsg("ignoring resilience state file \"%s\": not written by this version",
						STATE_FILE)));
		ok = false;
	}
	while (ok)
	{
		uint32		section[2];

		if (!state_read(file, section, sizeof(section)))
			ok = false;
		else if (section[0] == STATE_SECTION_END)
			break;
		else if (section[0] == STATE_SECTION_RATELIMIT)
			ok = ratelimit_state_load(file, section[1]);
		else if (section[0] == STATE_SECTION_BREAKER)
			ok = breaker_state_load(file, section[1]);
		else
			ok = false;
		if (!ok)
			ereport(LOG,
					(errmsg("resilience state file \"%s\" is damaged; the rest of it is ignored",
							STATE_FILE)));
	}
	FreeFile(file);
	unlink(STATE_FILE);
}
