/*-------------------------------------------------------------------------
 *
 * tenants.h
 *		Who owns what: the owner role of consumer names, inbox consumers,
 *		leases, streams, sagas (and idempotency keys, which are checked with
 *		tenant_may_act), and the rule that only that role, its members and
 *		resilience_admin may act on them (src/tenants.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef RESILIENCE_TENANTS_H
#define RESILIENCE_TENANTS_H

#include "postgres.h"

/* What can be owned; the names are resilience.owners.kind (and set_owner's). */
typedef enum TenantKind
{
	TENANT_OUTBOX_CONSUMER,
	TENANT_INBOX_CONSUMER,
	TENANT_LEASE,
	TENANT_STREAM,
	TENANT_SAGA,
	NUM_TENANT_KINDS
} TenantKind;

extern const char *const tenant_kind_names[NUM_TENANT_KINDS];

/* Is the 0.2 schema there (resilience.owners)?  Without it nothing is checked. */
extern bool tenants_enabled(void);

/* May caller act on what owner owns?  (No owner: anyone may.) */
extern bool tenant_may_act(Oid caller, Oid owner);

/* Raise 42501 for caller on kind `name`, owned by owner. */
extern void tenant_deny(TenantKind kind, const char *name, Oid owner);

/* tenant_deny unless tenant_may_act(caller, owner). */
extern void tenant_check(TenantKind kind, const char *name, Oid owner, Oid caller);

/*
 * A consumer name (outbox or inbox): its owner from resilience.owners, or
 * caller's from now on if it has none; raises 42501 if caller may not act
 * on it.  Called connected to SPI, as the extension's owner.
 */
extern void tenant_claim(TenantKind kind, const char *name, int len, Oid caller);

/* The owner an admin declared for kind `name`, or InvalidOid (SPI connected, as the owner). */
extern Oid	tenant_declared_owner(TenantKind kind, const char *name, int len);

/* A role by regrole's output (the owner_role::text read from a row); OID_MAX if unknown. */
extern Oid	tenant_role_by_name(const char *name);

#endif							/* RESILIENCE_TENANTS_H */
