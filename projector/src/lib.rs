//! Projector: folds the event stream, exactly once, into a redb view. (Built in issue 4.)
