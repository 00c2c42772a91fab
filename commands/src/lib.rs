//! Command side: pure decisions (`decide(&view, command)`), scheduling and fenced claims. (Built in issue 5.)
