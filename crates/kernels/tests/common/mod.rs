pub mod equiv;
