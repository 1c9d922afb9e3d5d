//! Chat addresses: routes of inbound messages and targets of outbound ones.

use super::*;

/// A chat address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Route {
    pub(crate) platform: String,
    pub(crate) group_id: String,
    pub(crate) user_id: String,
}

impl Route {
    /// `platform:groupId:userId`.
    pub(crate) fn as_string(&self) -> String {
        format!("{}:{}:{}", self.platform, self.group_id, self.user_id)
    }

    /// The session key used when the client gives none.
    pub(crate) fn session_key(&self, account: &str) -> String {
        format!("bncr:{account}:{}", self.as_string())
    }

    /// Parse an outbound target: `Bncr:<platform>:<groupId>:<userId>`, the
    /// `Bncr:` prefix optional (any case). `userId` keeps any further colons.
    pub(crate) fn parse_target(to: &str) -> Option<Route> {
        let to = to.trim();
        let rest = match to.get(..5) {
            Some(p) if p.eq_ignore_ascii_case("bncr:") => &to[5..],
            _ => to,
        };
        let mut it = rest.splitn(3, ':');
        let (p, g, u) = (it.next()?, it.next()?, it.next()?);
        if p.is_empty() || g.is_empty() || u.is_empty() {
            return None;
        }
        Some(Route {
            platform: p.into(),
            group_id: g.into(),
            user_id: u.into(),
        })
    }
}

/// The route of an inbound request, or the contract's error.
pub(crate) fn inbound_route(
    platform: &Option<String>,
    group_id: &Option<IdStr>,
    user_id: &Option<IdStr>,
) -> Result<Route, RpcError> {
    let platform = platform.as_deref().map(str::trim).unwrap_or_default();
    let group = params::id_opt(group_id).unwrap_or_else(|| "0".into());
    let user = params::id_opt(user_id).unwrap_or_default();
    if platform.is_empty() || user.is_empty() {
        return Err(RpcError::invalid_request(
            "platform/groupId/userId required",
        ));
    }
    Ok(Route {
        platform: platform.into(),
        group_id: group,
        user_id: user,
    })
}
