"""ACLs on the secured test broker (its PLAINTEXT super user's admin client), by name: what the tests grant, deny
and lift."""

from __future__ import annotations

from kafka import KafkaAdminClient
from kafka.admin import (
    ACL,
    ACLFilter,
    ACLOperation,
    ACLPermissionType,
    ACLResourcePatternType,
    ResourcePattern,
    ResourcePatternFilter,
    ResourceType,
)

from pipeline.localinfra.kafka import SASL_USER

PRINCIPAL = f"User:{SASL_USER}"


def add_acls(admin: KafkaAdminClient, *rules: tuple[str, str, str, str]) -> None:
    """Add ``(operation, permission, resource type, name)`` rules (e.g. ``("WRITE", "DENY", "TOPIC", "t")``) for
    the test principal; AssertionError when the broker refuses one."""
    acls = [ACL(PRINCIPAL, "*", ACLOperation[op], ACLPermissionType[permission],
                ResourcePattern(ResourceType[kind], name, ACLResourcePatternType.LITERAL))
            for op, permission, kind, name in rules]
    assert not admin.create_acls(acls)["failed"]


def lift_write_denial(admin: KafkaAdminClient, topic: str) -> None:
    """Delete the test principal's DENY of WRITE on ``topic``."""
    pattern = ResourcePatternFilter(ResourceType.TOPIC, topic, ACLResourcePatternType.LITERAL)
    admin.delete_acls([ACLFilter(PRINCIPAL, "*", ACLOperation.WRITE, ACLPermissionType.DENY, pattern)])
