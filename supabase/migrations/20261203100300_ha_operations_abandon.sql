-- Multi-region HA/DR: an operation can be abandoned explicitly.
--
-- A resumed operation re-checks the world before it acts again (the epoch must still be the one
-- it started from, or the one it is moving to); one whose world moved on can no longer be
-- resumed, and an operator closes it with POST /failover/operations/{id}/abandon. Abandoning
-- undoes nothing by itself: the audit trail says which step it stood at (runbooks/failover.md).

alter table ha.operations drop constraint if exists operations_state_check;
alter table ha.operations add constraint operations_state_check
  check (state in ('running', 'succeeded', 'rolled_back', 'failed_closed', 'failed', 'abandoned'));
