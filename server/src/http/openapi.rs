//! The OpenAPI document, generated from the handlers' annotations and the
//! JSON types themselves (utoipa), so that it cannot drift from the code.
//! A route added to [`super::router`] must be added to `paths(...)` here;
//! the end-to-end tests check that every documented route is served and
//! that the document holds exactly the routes padlockd serves.

use super::error::{ErrorBody, ErrorDetail};
use super::model;
use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "padlockd",
        description = "Named locks held for as long as a stream stays open. The HTTP side: \
            inspection, admin, live events, holding a lock from a shell, operations. \
            Every error answers `{\"error\": {\"code\", \"message\"}}`.",
        license(name = "Apache-2.0"),
    ),
    paths(
        super::dashboard::index,
        super::dashboard::asset,
        super::healthz,
        super::readyz,
        super::metrics,
        document,
        super::events::events,
        super::locks::list_locks,
        super::locks::get_lock,
        super::hold::hold,
        super::locks::revoke,
        super::locks::revoke_holder,
        super::stats::server,
        super::stats::stats,
    ),
    components(schemas(
        ErrorBody,
        ErrorDetail,
        model::Kind,
        model::Mode,
        model::Reason,
        model::Lock,
        model::Holder,
        model::Waiter,
        model::LockList,
        model::Revoked,
        model::HolderRef,
        model::Health,
        model::HoldLine,
        model::Grant,
        model::HoldBody,
        model::Event,
        model::EventType,
        super::stats::ServerState,
        super::stats::KindState,
        super::stats::Stats,
        super::stats::PerSecond,
        super::stats::MinuteStats,
        super::stats::Percentiles,
        super::stats::Contended,
    )),
    modifiers(&AdminToken),
    tags(
        (name = "locks", description = "Who holds and who waits; hold a lock; follow changes"),
        (name = "admin", description = "Mutating endpoints: need `Authorization: Bearer <admin token>`"),
        (name = "operations", description = "Health, readiness, metrics, this document"),
        (name = "dashboard", description = "The web page for people"),
    )
)]
pub struct ApiDoc;

struct AdminToken;

impl Modify for AdminToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "client_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A token in padlockd's --client-token-file, when it has one: then lock \
                         endpoints need it (the admin token also works), and it limits them to \
                         its name prefix",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The token in padlockd's --admin-token-file (PADLOCK_ADMIN_TOKEN_FILE)",
                    ))
                    .build(),
            ),
        );
    }
}

/// This document.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "operations",
    responses((status = 200, description = "OpenAPI 3.1 document", content_type = "application/json"))
)]
pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    Json(doc)
}
