//! Size limits. They bound what a peer, a chain event or a file on disk can
//! make us allocate or hash, and they are checked on decode and on validation.

/// Fewest participants in a channel.
pub const MIN_PARTICIPANTS: usize = 2;
/// Most participants in a channel.
pub const MAX_PARTICIPANTS: usize = 16;
/// Fewest assets in a channel.
pub const MIN_ASSETS: usize = 1;
/// Most assets in a channel.
pub const MAX_ASSETS: usize = 16;
/// Largest step between consecutive fully signed versions. Versions may
/// skip numbers: a version that some participant signed in an update that
/// then failed is burnt (nobody may sign it again with other contents), so
/// the next update uses a higher one. The bound keeps a peer from spending
/// the version space in one step.
pub const MAX_VERSION_STEP: u64 = 1 << 20;
/// Largest `appData`, in bytes.
pub const MAX_APP_DATA: usize = 64 * 1024;
/// Shortest challenge duration, in seconds.
pub const MIN_CHALLENGE_DURATION: u64 = 1;
/// Longest challenge duration, in seconds (365 days, as the adjudicator enforces): deposits
/// must not be locked for ever.
pub const MAX_CHALLENGE_DURATION: u64 = 365 * 24 * 60 * 60;
