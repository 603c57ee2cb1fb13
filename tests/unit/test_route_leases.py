"""When a placement taken out of the routes is drained (cluster/route_leases.py)."""

from __future__ import annotations

from cluster.route_leases import GRACE, MARGIN, RouteLeases

TTL = 1.0


def test_a_model_nobody_asked_for_lately_is_drained_at_once():
    leases = RouteLeases(TTL)
    leases.took("phi", "ingress-a", now=100.0)
    assert leases.drained_at("phi", removed=200.0) == 200.0
    assert leases.drained_at("never-asked", removed=5.0) == 5.0


def test_routes_taken_before_the_removal_hold_it_until_they_expire():
    leases = RouteLeases(TTL)
    leases.took("phi", "ingress-a", now=99.6)
    assert leases.drained_at("phi", removed=100.0) == 99.6 + TTL + MARGIN


def test_an_ingress_that_asked_again_has_acknowledged_the_removal():
    leases = RouteLeases(TTL)
    leases.took("phi", "ingress-a", now=99.6)
    leases.took("phi", "ingress-a", now=100.2)  # asked again after the removal at 100
    assert leases.drained_at("phi", removed=100.0) == 100.2 + GRACE


def test_every_ingress_must_have_dropped_the_old_routes():
    leases = RouteLeases(TTL)
    leases.took("phi", "ingress-a", now=99.9)
    leases.took("phi", "ingress-b", now=99.5)
    leases.took("phi", "ingress-b", now=100.1)  # b acknowledged; a still holds its copy
    assert leases.drained_at("phi", removed=100.0) == 99.9 + TTL + MARGIN


def test_leases_of_other_models_do_not_count():
    leases = RouteLeases(TTL)
    leases.took("llama", "ingress-a", now=100.0)
    assert leases.drained_at("phi", removed=100.0) == 100.0


def test_expired_leases_are_forgotten():
    leases = RouteLeases(TTL)
    leases.took("phi", "ingress-a", now=100.0)
    leases.took("llama", "ingress-a", now=101.4)
    leases.forget_expired(now=102.0)
    assert leases.drained_at("phi", removed=101.0) == 101.0
    assert leases.drained_at("llama", removed=101.5) == 101.4 + TTL + MARGIN
